// lora-stack: several adapters applied together, with stability checks.
#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/stack.h"
#include "support/cli.h"
#include "support/options.h"

int main(int argc, char** argv) {
    lorakit::cli::Tool tool(
        "lora-stack",
        "Stack LoRA adapters as a runtime applies them together (dW = sum w_i * scale_i * B_i A_i per module) and\n"
        "report how stable the stack is, from the factors only:\n"
        "  strength   |sum dW|_2 / the strongest adapter's |dW|_2 at weight 1 (one adapter at weight w: |w|)\n"
        "  kappa      |sum dW|_F^2 / sum |dW_i|_F^2 (1 independent, n for n copies of one adapter, 0 cancelling)\n"
        "  cosine     <dW_i, dW_j> / (|dW_i| |dW_j|) per pair; RMS over modules in the summary\n"
        "  overlap    phi of the adapters' top output subspaces (1: same directions)\n"
        "  signs      sign conflicts among the largest sampled entries (independent adapters: about 50%)\n"
        "  |dW|/|W|   with --base: the stack's spectral norm over the base weight's, and fp16 overflow\n"
        "Verdict per module: unstable if strength >= 2 (an adapter doubled), |dW|/|W| >= 1 or W + dW overflows the\n"
        "base dtype; warn if strength > 1.5 or |dW|/|W| > 0.5; else ok (thresholds: see README, --*-warn options).");
    lorakit::StackRequest request;
    lorakit::cli::RankOptions rank;
    std::string dtype, weights;
    auto& app = tool.app();
    auto& th = request.options.thresholds;
    app.add_option("inputs", request.inputs, "adapters, each optionally with its weight: PATH:W")
        ->required()->type_name("ADAPTER[:W]...");
    app.add_option("--base", request.base, "base checkpoint (file, sharded checkpoint or diffusers folder)")
        ->type_name("CHECKPOINT");
    tool.add_output_option(request.output, "write the stacked adapter to OUT (exact concatenation, or --rank/--dynamic)");
    rank.add_to(app, false, false);
    app.add_option("--weights", weights, "comma-separated weight per adapter instead of PATH:W")->type_name("W1,W2,...");
    app.add_flag("--auto-scale", request.auto_scale, "scale all weights by the largest factor that makes every module ok");
    app.add_flag("--strict", request.strict, "exit 1 (and write nothing) when the verdict is unstable");
    app.add_option("--top", request.top, "modules in the table, worst first (0: all; default 15)");
    app.add_option("--strength-warn", th.strength_warn, "strength above which a module warns (default 1.5)");
    app.add_option("--strength-unstable", th.strength_unstable, "strength from which a module is unstable (default 2)");
    app.add_option("--base-warn", th.base_warn, "|dW|/|W| above which a module warns (default 0.5)");
    app.add_option("--base-unstable", th.base_unstable, "|dW|/|W| from which a module is unstable (default 1)");
    app.add_option("--subspace-energy", request.options.subspace_energy,
                   "share of each adapter's energy whose singular vectors form its subspace (default 0.9)");
    app.add_option("--samples", request.options.samples, "entries sampled per module for sign conflicts (default 8192)")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--seed", request.options.seed, "seed of the sampling (same seed, same report)");
    app.add_option("--dtype", dtype, "output dtype: f32, f16 or bf16 (default: the inputs' common dtype)");
    app.add_option("--to", request.to, "output convention (default: the first adapter's)");
    app.add_option("-j,--threads", request.options.threads, "worker threads (default: all cores)")->check(CLI::NonNegativeNumber);
    tool.add_force_option(request.force);
    tool.add_json_option(request.json, "print every number as JSON on stdout");
    tool.add_verbosity_options();
    app.footer("Exit status: 0 ok (warn and unstable included, unless --strict), 1 unstable with --strict, 2 usage error,\n"
               "3 bad or unsupported input, 4 I/O error.");
    return tool.run(argc, argv, [&] {
        request.inputs = lorakit::cli::Tool::expand_argument_files(request.inputs);
        if (!weights.empty()) request.options.weights = lorakit::cli::parse_weights(weights);
        if (rank.rank > 0 || !rank.dynamic.empty()) request.rank = rank.finish();
        if (!dtype.empty()) request.dtype = lorakit::cli::parse_output_dtype(dtype);
        return tool.finish(lorakit::run_stack(lorakit::formats::builtin_registry(), request, tool.progress()));
    });
}
