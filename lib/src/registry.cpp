#include "lorakit/registry.h"

#include "lorakit/atomic_file.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <optional>
#include <sstream>

#include <fmt/format.h>

#include "lorakit/base_model.h"
#include "lorakit/checkpoint.h"
#include "lorakit/error.h"
#include "lorakit/names.h"
#include "lorakit/progress.h"
#include "parallel.h"

namespace lorakit {

namespace fs = std::filesystem;

// ---- TensorFile -------------------------------------------------------------------------

void TensorFile::build_index() {
    index_.clear();
    const auto& all = entries();
    for (std::size_t i = 0; i < all.size(); ++i) index_.emplace(all[i].name, i);
}

const TensorEntry* TensorFile::find(std::string_view tensor_name) const {
    auto it = index_.find(tensor_name);
    return it == index_.end() ? nullptr : &entries()[it->second];
}

Tensor TensorFile::tensor(std::string_view tensor_name) const {
    const TensorEntry* entry = find(tensor_name);
    if (!entry) fail(ErrorCode::bad_input, "no tensor named {}", quote(tensor_name));
    if (!entry->supported())
        fail(ErrorCode::unsupported, "tensor {} has unsupported dtype {}", quote(tensor_name), entry->dtype_name);
    if (entry->decode) return Tensor::from_f32(DType::F32, entry->shape, entry->to_f32());
    return entry->tensor;
}

// ---- TensorEntry ------------------------------------------------------------------------

std::int64_t TensorEntry::element_count() const { return decode ? checked_element_count(shape) : tensor.view().element_count(); }

void TensorEntry::to_f32(std::vector<float>& out) const {
    if (!supported())
        fail(ErrorCode::unsupported, "tensor {} has type {}, which lorakit cannot compute with", quote(name), dtype_name);
    out.resize(static_cast<std::size_t>(element_count()));
    to_f32(std::span<float>(out));
}

void TensorEntry::to_f32(std::span<float> out) const {
    if (!supported())
        fail(ErrorCode::unsupported, "tensor {} has type {}, which lorakit cannot compute with", quote(name), dtype_name);
    if (out.size() != static_cast<std::size_t>(element_count()))
        fail(ErrorCode::internal, "tensor {}: {} values into room for {}", quote(name), element_count(), out.size());
    if (decode) decode(out);
    else tensor.view().to_f32(out);
}

std::vector<float> TensorEntry::to_f32() const {
    std::vector<float> out;
    to_f32(out);
    return out;
}

// ---- ConventionDriver defaults -----------------------------------------------------------

std::optional<LocatedAdapter> ConventionDriver::locate(const fs::path&) const { return std::nullopt; }
std::vector<std::string> ConventionDriver::sidecar_config_names() const { return {}; }
void ConventionDriver::precheck(const SidecarConfig&) const {}
void ConventionDriver::write(const Adapter&, const fs::path&, const WriteOptions&, std::vector<std::string>&) const {
    fail(ErrorCode::unsupported, "lorakit cannot write the {} convention", name());
}

// ---- Registry -----------------------------------------------------------------------------

void Registry::add(std::unique_ptr<ContainerDriver> driver) { containers_.push_back(std::move(driver)); }
void Registry::add(std::unique_ptr<ConventionDriver> driver) { conventions_.push_back(std::move(driver)); }

const ConventionDriver* Registry::convention(std::string_view name) const {
    for (const auto& driver : conventions_)
        if (driver->name() == name) return driver.get();
    return nullptr;
}

namespace {

// "out/" names the directory "out": writers and checks take the path without the separator.
fs::path without_trailing_slash(const fs::path& target) {
    const std::string text = target.string();
    const std::size_t end = text.find_last_not_of('/');
    if (end == std::string::npos || end + 1 == text.size()) return target;
    return fs::path(text.substr(0, end + 1));
}

}  // namespace

const ConventionDriver& Registry::writer(std::string_view name) const {
    const ConventionDriver* driver = convention(name == "lycoris" ? std::string_view("kohya") : name);
    if (!driver) {
        std::vector<std::string_view> names;
        for (const auto& d : conventions_) names.push_back(d->name());
        fail(ErrorCode::usage, "unknown convention {} (known: {})", quote(name), fmt::join(names, ", "));
    }
    return *driver;
}

void Registry::write_adapter(const Adapter& adapter, std::string_view name, const fs::path& given_target,
                             const WriteOptions& options, std::vector<std::string>& notes) const {
    const fs::path target = without_trailing_slash(given_target);
    const ConventionDriver& driver = writer(name);
    with_context(quote(target.string()), [&] { driver.write(adapter, target, options, notes); });
}

std::string Registry::output_convention(std::string_view requested, std::string_view input, const fs::path& target) const {
    enum class Kind { any, gguf_file, safetensors_file, directory };
    const std::string text = target.string();
    std::string extension = target.extension().string();
    std::transform(extension.begin(), extension.end(), extension.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    std::error_code ec;
    Kind kind = Kind::any;
    if (text.empty() || text == "-") kind = Kind::any;  // no output, or standard output
    else if (text.back() == '/') kind = Kind::directory;
    else if (fs::is_directory(target, ec)) kind = Kind::directory;
    else if (extension == ".gguf") kind = Kind::gguf_file;
    else if (extension == ".safetensors") kind = Kind::safetensors_file;
    auto what = [&](std::string_view name) -> std::string_view {
        const ConventionDriver& d = writer(name);
        return d.writes_directory() ? "a directory" : d.name() == "gguf" ? "a GGUF file" : "a safetensors file";
    };
    auto fits = [&](std::string_view name) {
        const ConventionDriver& d = writer(name);
        switch (kind) {
        case Kind::gguf_file: return d.name() == "gguf";
        case Kind::safetensors_file: return !d.writes_directory() && d.name() != "gguf";
        case Kind::directory: return d.writes_directory();
        case Kind::any: return true;
        }
        return true;
    };
    const std::string_view named = kind == Kind::gguf_file          ? "a GGUF file"
                                   : kind == Kind::safetensors_file ? "a safetensors file"
                                                                    : "a directory";
    if (!requested.empty()) {
        if (!fits(requested))
            fail(ErrorCode::usage, "--to {} writes {}, but the output {} names {}", requested, what(requested),
                 quote(text), named);
        return std::string(requested);
    }
    if (fits(input)) return std::string(input);
    switch (kind) {
    case Kind::gguf_file: return "gguf";
    case Kind::directory: return "peft";
    default:
        fail(ErrorCode::usage,
             "the output {} names a safetensors file, but the input's convention ({}) writes {}: give --to (kohya or "
             "diffusers write one safetensors file) or name a directory",
             quote(text), input, what(input));
    }
}

void Registry::check_output(std::string_view name, const fs::path& given_target, bool overwrite) const {
    const fs::path target = without_trailing_slash(given_target);
    const ConventionDriver* driver = convention(name == "lycoris" ? std::string_view("kohya") : name);
    if (driver && driver->writes_directory()) {
        if (target == "-")
            fail(ErrorCode::usage, "a {} adapter is a directory; '-' (standard output) takes single files only", driver->name());
        std::error_code ec;
        if (fs::exists(target, ec) && !overwrite)
            fail(ErrorCode::usage, "output {} exists (use --force to replace it)", quote(target.string()));
    } else {
        check_output_path(target, overwrite);
    }
}

std::unique_ptr<TensorFile> Registry::open_tensor_file(const fs::path& path) const {
    auto file = MappedFile::open(path);
    return open_tensor_file(std::move(file));
}

const ContainerDriver& Registry::identify_container(const MappedFile& file) const {
    const auto bytes = file.bytes();
    if (bytes.empty()) fail(ErrorCode::bad_input, "file is empty");
    const auto head = bytes.first(std::min<std::size_t>(bytes.size(), 64));
    const ContainerDriver* best = nullptr;
    int best_score = 0;
    for (const auto& driver : containers_) {
        const int score = driver->identify(head, file.path());
        if (score > best_score) {
            best_score = score;
            best = driver.get();
        }
    }
    if (!best) {
        std::vector<std::string_view> names;
        for (const auto& driver : containers_) names.push_back(driver->name());
        fail(ErrorCode::bad_input, "not a recognised tensor file (tried {})", fmt::join(names, ", "));
    }
    return *best;
}

std::unique_ptr<TensorFile> Registry::open_tensor_file(std::shared_ptr<const MappedFile> file) const {
    return with_context(quote(file->name()), [&] { return identify_container(*file).open(file); });
}

std::optional<SidecarConfig> Registry::find_sidecar(const fs::path& weights) const {
    if (weights == "-") return std::nullopt;
    fs::path dir = weights.parent_path();
    if (dir.empty()) dir = ".";
    for (const auto& driver : conventions_) {
        for (const auto& name : driver->sidecar_config_names()) {
            const fs::path candidate = dir / name;
            std::error_code ec;
            if (fs::is_regular_file(candidate, ec)) return SidecarConfig{candidate, read_text_file(candidate)};
        }
    }
    return std::nullopt;
}

std::unique_ptr<Checkpoint> Registry::open_checkpoint(const fs::path& path) const {
    if (!checkpoint_opener_) fail(ErrorCode::usage, "no checkpoint layouts are registered");
    return with_context(quote(path.string()), [&] { return checkpoint_opener_(*this, path); });
}

std::pair<std::string, std::optional<double>> split_weight(const std::string& argument) {
    const auto colon = argument.rfind(':');
    if (colon == std::string::npos || colon + 1 == argument.size()) return {argument, std::nullopt};
    const std::string tail = argument.substr(colon + 1);
    char* end = nullptr;
    const double w = std::strtod(tail.c_str(), &end);
    if (*end != '\0' || !std::isfinite(w) || tail.find_first_not_of("+-0123456789.eE") != std::string::npos)
        return {argument, std::nullopt};
    return {argument.substr(0, colon), w};
}

WeightedAdapters load_weighted_adapters(const Registry& registry, const std::vector<std::string>& arguments) {
    WeightedAdapters result;
    std::vector<std::string> paths;
    for (const auto& argument : arguments) {
        auto [path, weight] = split_weight(argument);
        paths.push_back(std::move(path));
        result.weights.push_back(weight);
    }
    result.adapters = load_adapters(registry, paths);
    return result;
}

std::vector<Adapter> load_adapters(const Registry& registry, const std::vector<std::string>& paths) {
    const std::size_t count = paths.size();
    std::vector<std::optional<Adapter>> loaded(count);
    std::vector<std::exception_ptr> failures(count);
    // Standard input is read whole by whichever load opens it: with it among the paths, one at a
    // time in order, as before (a second "-" then finds it empty, deterministically).
    const bool reads_stdin = std::find(paths.begin(), paths.end(), "-") != paths.end();
    // Failures are kept per path (not left to parallel_for, which stops at whichever comes first
    // in time), so that the first in argument order is the one thrown.
    detail::parallel_for(count, reads_stdin ? 1 : 0, no_progress(), [&](std::size_t i) -> std::uint64_t {
        try {
            loaded[i].emplace(registry.load_adapter(paths[i]));
        } catch (...) {
            failures[i] = std::current_exception();
        }
        return 0;
    });
    std::vector<Adapter> adapters;
    adapters.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
        if (failures[i]) std::rethrow_exception(failures[i]);
        adapters.push_back(std::move(*loaded[i]));
    }
    return adapters;
}

Adapter Registry::load_adapter(const fs::path& path, const ModelHints& hints) const {
    return with_context(quote(path.string()), [&] {
        fs::path weights = path;
        std::optional<SidecarConfig> config;
        std::error_code ec;
        if (path != "-" && fs::is_directory(path, ec)) {
            std::optional<LocatedAdapter> located;
            for (const auto& driver : conventions_) {
                located = driver->locate(path);
                if (located) break;
            }
            if (!located) fail(ErrorCode::bad_input, "directory holds no adapter weights file that lorakit knows");
            weights = located->weights;
            if (located->config) config = SidecarConfig{*located->config, read_text_file(*located->config)};
        } else {
            if (path != "-" && !fs::exists(path, ec)) fail(ErrorCode::io, "no such file or directory");
            config = find_sidecar(path);
        }
        // Identify the container first (a file that is no tensor file at all says so), then
        // let the config speak (a non-LoRA adapter type says so rather than its container),
        // then parse the container.
        auto file = MappedFile::open(weights);
        const ContainerDriver& container =
            with_context(quote(file->name()), [&]() -> const ContainerDriver& { return identify_container(*file); });
        if (config)
            with_context(quote(config->path.string()), [&] {
                for (const auto& driver : conventions_) driver->precheck(*config);
            });
        auto tensors = with_context(quote(file->name()), [&] { return container.open(file); });
        return with_context(quote(file->name()), [&] { return read_adapter(path.string(), *tensors, config, hints); });
    });
}

Adapter Registry::read_adapter(const std::string& source, const TensorFile& tensors,
                               const std::optional<SidecarConfig>& config, const ModelHints& hints) const {
    AdapterInput input{source, tensors, config, hints};
    const ConventionDriver* best = nullptr;
    Detection best_detection;
    for (const auto& driver : conventions_) {
        Detection detection = driver->detect(input);
        if (detection.score > best_detection.score) {
            best_detection = std::move(detection);
            best = driver.get();
        }
    }
    if (!best) {
        std::vector<std::string_view> names;
        for (const auto& driver : conventions_) names.push_back(driver->name());
        std::vector<std::string> keys;
        for (const auto& entry : tensors.entries()) {
            if (keys.size() == 4) break;
            keys.push_back(quote(entry.name));
        }
        if (tensors.entries().empty())
            fail(ErrorCode::bad_input, "not a LoRA adapter: the file holds no tensors (tried {})", fmt::join(names, ", "));
        fail(ErrorCode::bad_input, "not a LoRA adapter in any known layout (tried {}); its {} tensors include {}",
             fmt::join(names, ", "), tensors.entries().size(), fmt::join(keys, ", "));
    }
    Adapter adapter = best->read(input);
    adapter.source = source;
    adapter.container = std::string(tensors.format_name());
    if (adapter.convention.empty()) adapter.convention = std::string(best->name());
    if (adapter.convention_detail.empty()) adapter.convention_detail = best_detection.detail;
    if (adapter.metadata.empty()) adapter.metadata = tensors.metadata();
    if (config && adapter.config_json.empty()) {
        adapter.config_json = config->text;
        adapter.config_path = config->path.string();
    }
    for (const auto& module : adapter.modules) validate_module(module);
    std::stable_sort(adapter.modules.begin(), adapter.modules.end(),
                     [](const LoraModule& a, const LoraModule& b) { return natural_less(a.name, b.name); });
    std::stable_sort(adapter.lycoris_modules.begin(), adapter.lycoris_modules.end(),
                     [](const LycorisModule& a, const LycorisModule& b) { return natural_less(a.name, b.name); });
    infer_base_model(adapter);
    return adapter;
}

std::string read_text_file(const fs::path& path, std::size_t max_bytes) {
    auto file = MappedFile::open(path);
    if (file->size() > max_bytes)
        fail(ErrorCode::bad_input, "{} is {} bytes, more than the {} allowed for a config file", quote(path.string()),
             file->size(), max_bytes);
    const auto bytes = file->bytes();
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

}  // namespace lorakit
