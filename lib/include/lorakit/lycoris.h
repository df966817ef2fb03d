// LyCORIS modules as plain LoRA: the module's ΔW is materialised with the scale consumers apply
// (ComfyUI / A1111 file semantics, research/formats.md §7.2) and re-factored by a truncated SVD.
#pragma once

#include <cstdint>
#include <vector>

#include "lorakit/adapter.h"
#include "lorakit/linalg.h"

namespace lorakit {

// ΔW of a LoHa, LoKr (incl. Tucker and full-matrix factors), full/diff or LoCon-Tucker module,
// scale included, as a row-major [out, in·kh·kw] matrix; `weight_shape` is [out, in] or
// [out, in, kh, kw] where the tensors tell the kernel (LoHa/LoKr without Tucker store conv
// kernels flattened: then [out, in·kh·kw]). Throws unsupported for (IA)³, GLoRA and norm
// modules (their delta needs the base weight or is not a matrix) and for DoRA.
struct LycorisDelta {
    Shape weight_shape;
    std::vector<float> values;
    std::optional<Tensor> bias;  // full modules' diff_b
    std::int64_t rows() const { return weight_shape.at(0); }
    std::int64_t cols() const;
};
LycorisDelta lycoris_delta(const LycorisModule& module);

struct LycorisConversion {
    LoraModule module;            // rank min(k, out, in): up = U·Σ, down = Vᵀ, alpha = rank (scale 1)
    double relative_error = 0;    // ||ΔW - B·A||_F / ||ΔW||_F, measured on the result
    bool randomized = false;      // the SVD was randomized (large modules)
};
LycorisConversion lycoris_to_lora(const LycorisModule& module, std::int64_t rank, DType dtype,
                                  const linalg::DenseSvdOptions& options = {});

}  // namespace lorakit
