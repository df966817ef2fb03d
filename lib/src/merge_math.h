// The element-wise merge kernels of PEFT's merge_utils.py (task arithmetic, TIES, DARE,
// magnitude pruning) and torch.quantile's linear interpolation, on flat f32 arrays.
#pragma once

#include <cstdint>
#include <vector>

#include "lorakit/merge.h"

namespace lorakit::detail {

// Keeps the int(density · n) entries of largest magnitude (ties: lower index first), zeroes
// the rest. density >= 1 keeps everything.
void magnitude_prune_in_place(std::vector<float>& t, double density);
// Keeps each entry with probability `density` (deterministic for a seed), scaled by 1/density.
void random_prune_in_place(std::vector<float>& t, double density, std::uint64_t seed);

// MERGE({T_i}, {v_i}) for the PEFT methods on equally sized tensors.
std::vector<float> merge_tensors(std::vector<std::vector<float>> tensors, const std::vector<double>& weights,
                                 MergeMethod method, double density, MajoritySign sign, std::uint64_t seed);

// torch.quantile(values, q) with linear interpolation ('linear', the default).
double quantile(std::vector<float> values, double q);

}  // namespace lorakit::detail
