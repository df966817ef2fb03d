#include "lorakit/checkpoint.h"

#include <filesystem>

#include <fmt/format.h>

#include "lorakit/error.h"

namespace lorakit {

std::string WeightLocation::describe() const {
    const std::string name = entry ? entry->name : std::string("?");
    if (rows.empty()) return name;
    // Contiguous ranges are the common case (fused parts); anything else is a permutation.
    bool contiguous = true;
    for (std::size_t i = 1; i < rows.size(); ++i) contiguous &= rows[i] == rows[i - 1] + 1;
    if (contiguous) return fmt::format("{} rows {}..{}", name, rows.front(), rows.back() + 1);
    return fmt::format("{} ({} rows, permuted)", name, rows.size());
}

namespace {

// The rows of the tensor as the module sees it (its columns are the module's flat_in), after
// checking that the module's out x flat_in ΔW fits the location.
std::int64_t checked_tensor_rows(const WeightLocation& where, const LoraModule& module) {
    const TensorEntry& e = *where.entry;
    if (!e.supported())
        fail(ErrorCode::unsupported, "base tensor {} has type {}, which lorakit cannot compute with", quote(e.name),
             e.dtype_name);
    const std::int64_t out = module.out_features(), in = module.flat_in_features();
    const auto count = e.element_count();
    std::int64_t tensor_rows = e.shape.empty() ? 1 : e.shape[0];
    if (where.transposed) tensor_rows = e.shape.size() == 2 ? e.shape[1] : 0;
    const std::int64_t tensor_cols = tensor_rows > 0 ? count / tensor_rows : 0;
    if (tensor_cols != in || (where.rows.empty() ? tensor_rows != out : static_cast<std::int64_t>(where.rows.size()) != out))
        fail(ErrorCode::bad_input, "base tensor {} has shape {}, which cannot take module {} ({} -> {})", quote(e.name),
             format_shape(e.shape), quote(module.name), in, out);
    return tensor_rows;
}

}  // namespace

std::optional<TensorView> weight_in_place(const WeightLocation& where, const LoraModule& module) {
    const std::int64_t tensor_rows = checked_tensor_rows(where, module);
    const TensorEntry& e = *where.entry;
    if (where.transposed || e.decode) return std::nullopt;
    const DType type = e.tensor.dtype();
    if (type != DType::F32 && type != DType::F16 && type != DType::BF16) return std::nullopt;
    const std::int64_t out = module.out_features(), in = module.flat_in_features();
    std::int64_t first = 0;
    if (!where.rows.empty()) {  // a contiguous range of rows is a slice; any other order is not
        first = where.rows.front();
        for (std::size_t i = 0; i < where.rows.size(); ++i)
            if (where.rows[i] != first + static_cast<std::int64_t>(i)) return std::nullopt;
        if (first < 0 || first + out > tensor_rows)
            fail(ErrorCode::internal, "rows {}..{} outside base tensor {}", first, first + out, quote(e.name));
    }
    const std::size_t row_bytes = static_cast<std::size_t>(in) * dtype_size(type);
    return TensorView(type, Shape{out, in}, e.tensor.bytes().subspan(static_cast<std::size_t>(first) * row_bytes,
                                                                     static_cast<std::size_t>(out) * row_bytes));
}

std::span<float> gather_weight_into(const WeightLocation& where, const LoraModule& module, std::vector<float>& storage) {
    const TensorEntry& e = *where.entry;
    const std::int64_t tensor_rows = checked_tensor_rows(where, module);
    const std::int64_t out = module.out_features(), in = module.flat_in_features();
    const auto size = static_cast<std::size_t>(out * in);
    if (storage.size() < size) storage.resize(size);
    const std::span<float> w(storage.data(), size);
    if (where.rows.empty() && !where.transposed) {  // the tensor as it is
        e.to_f32(w);
        return w;
    }
    const std::vector<float> all = e.to_f32();
    for (std::int64_t p = 0; p < out; ++p) {
        const std::int64_t row = where.rows.empty() ? p : where.rows[static_cast<std::size_t>(p)];
        if (row < 0 || row >= tensor_rows) fail(ErrorCode::internal, "row {} outside base tensor {}", row, quote(e.name));
        for (std::int64_t q = 0; q < in; ++q)
            w[static_cast<std::size_t>(p * in + q)] =
                where.transposed ? all[static_cast<std::size_t>(q * tensor_rows + row)] : all[static_cast<std::size_t>(row * in + q)];
    }
    return w;
}

std::vector<float> gather_weight(const WeightLocation& where, const LoraModule& module) {
    std::vector<float> w;
    w.resize(gather_weight_into(where, module, w).size());
    return w;
}

void refuse_replacing(const Checkpoint& checkpoint, std::string_view role, const std::string& output) {
    std::error_code ec;
    const auto target = std::filesystem::weakly_canonical(output, ec);
    bool replaces = target == std::filesystem::weakly_canonical(checkpoint.name(), ec);
    for (const auto& f : checkpoint.files()) replaces |= target == std::filesystem::weakly_canonical(f->name(), ec);
    if (replaces)
        fail(ErrorCode::usage, "the output {} would replace the {} {}; inputs are never modified", quote(output), role,
             quote(checkpoint.name()));
}

double dtype_finite_limit(std::string_view name) noexcept {
    if (name == "F16") return largest_finite(DType::F16);
    if (name == "BF16") return largest_finite(DType::BF16);
    if (name == "F32") return largest_finite(DType::F32);
    if (name == "F64") return 1.7976931348623157e308;
    if (name == "F8_E4M3") return 448.0;
    if (name == "F8_E5M2") return 57344.0;
    return 0;
}

}  // namespace lorakit
