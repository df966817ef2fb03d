// lora-merge: several LoRA adapters into one.
#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/merge.h"
#include "support/cli.h"
#include "support/options.h"

int main(int argc, char** argv) {
    lorakit::cli::Tool tool(
        "lora-merge",
        "Merge LoRA adapters into one. Methods and what they do to the strength of each input:\n"
        "  concat (default)  exact: dW = sum w_i * dW_i; ranks add up, each input keeps its strength times w_i\n"
        "  svd               the exact SVD of that sum, truncated (--rank N or --dynamic): the best approximation\n"
        "  cat               PEFT's exact concatenation (weights on lora_A); same result as concat\n"
        "  linear, ties, dare_linear, dare_ties, magnitude_prune\n"
        "                    PEFT: factors merged separately with sign(c)*sqrt(|c|) on A and sqrt(|c|) on B,\n"
        "                    c = w_i * scale_i; not a sum of deltas for several inputs (cross terms); equal ranks\n"
        "  ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd\n"
        "                    PEFT: TIES/DARE on the dense deltas with weights w_i, then a truncated SVD\n"
        "  --compat kohya    linear/concat as sd-scripts merge_lora.py (its ratio ends up squared: strength w*|w|;\n"
        "                    concat keeps the first alpha, scaling each input by r_i/R) and svd as svd_merge_lora.py\n"
        "  --compat peft-legacy  PEFT's svd methods before PR #3111 (scale applied twice: w * scale^2)\n"
        "Modules are matched by name; one present in only some inputs is merged from those.");
    lorakit::MergeRequest request;
    lorakit::cli::RankOptions rank;
    std::string method = "concat", weights, majority = "total", compat = "lorakit", split = "up", dtype, svd = "auto";
    double clamp = 0;
    auto& app = tool.app();
    app.add_option("inputs", request.inputs, "adapter files or directories")->required()->type_name("ADAPTER...");
    tool.add_output_option(request.output, "write the merged adapter to OUT (a directory for peft and mlx)");
    app.add_option("--method", method, "merge method (see above)")
        ->check(CLI::IsMember({"concat", "svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                               "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"}));
    app.add_option("--weights", weights, "comma-separated weight per input, negative to subtract (default: all 1)")
        ->type_name("W1,W2,...");
    rank.add_to(app, false, false);
    app.add_option("--density", request.options.density, "ties/dare/magnitude_prune: fraction of entries kept (0..1)")
        ->check(CLI::Range(0.0, 1.0));
    app.add_option("--majority-sign", majority, "ties: elect signs by total (sum) or frequency (count)")
        ->check(CLI::IsMember({"total", "frequency"}));
    app.add_option("--seed", request.options.seed, "dare: seed of the random masks (same seed, same bytes)");
    app.add_option("--clamp-quantile", clamp, "svd methods: clamp factors to this quantile of their values (kohya: 0.99)")
        ->check(CLI::Range(0.0, 1.0));
    app.add_option("--compat", compat, "lorakit (default), kohya or peft-legacy (see above)")
        ->check(CLI::IsMember({"lorakit", "kohya", "peft-legacy"}));
    app.add_option("--split", split, "svd methods: singular values into up (default) or balanced on both factors")
        ->check(CLI::IsMember({"up", "balanced"}));
    app.add_option("--svd", svd, "dense svd methods: auto (exact below 512, else randomized), exact, randomized")
        ->check(CLI::IsMember({"auto", "exact", "randomized"}));
    app.add_option("--dtype", dtype, "output dtype: f32, f16 or bf16 (default: the inputs' common dtype)");
    app.add_option("--to", request.to, "output convention (default: the first input's)");
    app.add_option("-j,--threads", request.options.threads, "worker threads (default: all cores)")->check(CLI::NonNegativeNumber);
    tool.add_force_option(request.force);
    tool.add_json_option(request.json, "print the per-module report as JSON on stdout");
    tool.add_verbosity_options();
    app.footer("Exit status: 0 ok, 2 usage error, 3 bad or unsupported input, 4 I/O error.");
    return tool.run(argc, argv, [&] {
        if (request.output.empty()) lorakit::fail(lorakit::ErrorCode::usage, "give -o OUT");
        request.inputs = lorakit::cli::Tool::expand_argument_files(request.inputs);
        auto& o = request.options;
        o.method = lorakit::parse_merge_method(method);
        if (!weights.empty()) o.weights = lorakit::cli::parse_weights(weights);
        if (rank.rank > 0 || !rank.dynamic.empty()) o.rank = rank.finish();
        o.majority_sign = majority == "frequency" ? lorakit::MajoritySign::frequency : lorakit::MajoritySign::total;
        o.compat = compat == "kohya" ? lorakit::MergeCompat::kohya
                   : compat == "peft-legacy" ? lorakit::MergeCompat::peft_legacy
                                             : lorakit::MergeCompat::lorakit;
        if (clamp > 0) o.clamp_quantile = clamp;
        o.split = split == "balanced" ? lorakit::FactorSplit::balanced : lorakit::FactorSplit::up;
        using Method = lorakit::linalg::DenseSvdOptions::Method;
        o.dense_svd.method = svd == "exact" ? Method::exact : svd == "randomized" ? Method::randomized : Method::automatic;
        if (!dtype.empty()) o.dtype = lorakit::cli::parse_output_dtype(dtype);
        return tool.finish(lorakit::run_merge(lorakit::formats::builtin_registry(), request, tool.progress()));
    });
}
