// lora-extract: a LoRA from the difference between a fine-tuned checkpoint and its base.
#include "lorakit/error.h"
#include "lorakit/extract.h"
#include "lorakit/formats/builtin.h"
#include "support/cli.h"
#include "support/options.h"

int main(int argc, char** argv) {
    lorakit::cli::Tool tool(
        "lora-extract",
        "Extract a LoRA adapter from a full fine-tune: per weight, dW = W_tuned - W_base (f32), streamed one tensor\n"
        "at a time from the memory-mapped checkpoints, and its truncated SVD at the rank the rule gives (randomized\n"
        "subspace iteration, seeded and deterministic; exact LAPACK for small matrices). up = U*S, down = V^T and\n"
        "alpha = rank (scale 1), as kohya's extract_lora_from_models.py writes them. Prints per module the rank, the\n"
        "Frobenius norm kept and the relative error |dW - BA|_F / |dW|_F. Both checkpoints may be a safetensors file\n"
        "(SD/SDXL/Flux single files, transformers models), a sharded checkpoint, a diffusers folder or a GGUF model;\n"
        "weights are matched by module, so the two may even be in different layouts. Norms, biases and embeddings\n"
        "are not factored; changed ones are counted in a note.");
    lorakit::ExtractRequest request;
    lorakit::cli::RankOptions rank;
    std::string dtype, svd = "auto";
    double clamp = 0;
    auto& app = tool.app();
    app.add_option("base", request.base, "the base checkpoint")->required()->type_name("BASE");
    app.add_option("tuned", request.tuned, "the fine-tuned checkpoint")->required()->type_name("TUNED");
    tool.add_output_option(request.output, "write the adapter to OUT (a directory for peft)");
    rank.add_to(app, true, false);
    app.get_option("--conv-rank")
        ->description("rank for convolutions with kernels larger than 1x1 (kohya's --conv_dim); without it they are\n"
                      "not extracted. 1x1 convolutions use --rank");
    app.add_option("--to", request.to, "output convention: peft or kohya (default: kohya for SD/SDXL/Flux, else peft)")
        ->check(CLI::IsMember({"peft", "kohya"}));
    app.add_option("--dtype", dtype, "dtype of the factors: f32, f16 or bf16 (default: the tuned weight's)");
    app.add_option("--min-diff", request.min_diff,
                   "skip weights whose largest |dW| is at most EPS (default 0: only identical weights are skipped;\n"
                   "kohya uses 0.01)")
        ->type_name("EPS")->check(CLI::NonNegativeNumber);
    app.add_option("--clamp-quantile", clamp,
                   "clamp both factors to +-the Q quantile of their values, as kohya does (0.99 there); off by default")
        ->type_name("Q")->check(CLI::Range(0.0, 1.0));
    app.add_option("--svd", svd, "auto (default: exact LAPACK up to 512 on the short side, randomized above), randomized\n"
                                 "or exact")
        ->check(CLI::IsMember({"auto", "randomized", "exact"}));
    app.add_option("--power-iters", request.fit.svd.power_iterations, "power iterations of the randomized SVD (default 2)")
        ->type_name("Q")->check(CLI::Range(0, 20));
    app.add_option("--oversample", request.fit.svd.oversample,
                   "extra sketch columns of the randomized SVD (default 10)")
        ->type_name("P")->check(CLI::NonNegativeNumber);
    app.add_flag("--keep-full", request.keep_full,
                 "keep changed tensors that are not factored (norms, biases, embeddings) whole: a LoRA bias for an\n"
                 "extracted module's bias, else PEFT modules_to_save (tuned values) or LyCORIS diff/diff_b (kohya)");
    app.add_flag("--allow-unmatched", request.allow_unmatched,
                 "skip tuned weights with no counterpart in the base (a warning) instead of failing");
    app.add_option("-j,--threads", request.threads, "weights decomposed at once, one per thread (default: all cores)")->check(CLI::NonNegativeNumber);
    tool.add_force_option(request.force);
    tool.add_json_option(request.json, "print the per-module report as JSON on stdout");
    tool.add_verbosity_options();
    app.footer("Exit status: 0 ok, 2 usage error, 3 bad or unsupported input (different models, nothing changed,\n"
               "NaN), 4 I/O error. A failed run leaves no output behind.");
    return tool.run(argc, argv, [&] {
        request.fit.rank = rank.finish();
        if (clamp > 0) request.fit.clamp_quantile = clamp;
        using Method = lorakit::linalg::DenseSvdOptions::Method;
        request.fit.svd.method = svd == "exact" ? Method::exact : svd == "randomized" ? Method::randomized : Method::automatic;
        if (!dtype.empty()) request.dtype = lorakit::cli::parse_output_dtype(dtype);
        return tool.finish(lorakit::run_extract(lorakit::formats::builtin_registry(), request, tool.progress()));
    });
}
