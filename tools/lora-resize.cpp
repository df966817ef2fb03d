// lora-resize: re-rank every module of an adapter from the exact SVD of its B·A.
#include "lorakit/formats/builtin.h"
#include "lorakit/resize.h"
#include "support/cli.h"
#include "support/options.h"

int main(int argc, char** argv) {
    lorakit::cli::Tool tool(
        "lora-resize",
        "Lower the rank of every module of a LoRA adapter. Each module's dW = scale * B*A is decomposed exactly\n"
        "from its factors (two r x r Gram eigenproblems, never the dense matrix), so the result is the best rank-k approximation,\n"
        "in seconds where dense-SVD tools take minutes. The scale is kept (new alpha = alpha/r * k, as kohya's\n"
        "resize_lora.py sets it). Modules already at or below the target rank are copied unchanged.\n"
        "Prints per module the old and new rank, the Frobenius norm kept and the relative error.");
    lorakit::ResizeRequest request;
    lorakit::cli::RankOptions rank;
    std::string split = "up", dtype;
    bool dry_run = false;
    auto& app = tool.app();
    app.add_option("input", request.input, "adapter file or directory")->required()->type_name("IN");
    tool.add_output_option(request.output, "write the resized adapter to OUT (a directory for peft and mlx)");
    rank.add_to(app, true);
    app.add_option("--split", split,
                   "where the singular values go: up (B = U*S, A = V^T; kohya, PEFT) or balanced (sqrt(S) on both;\n"
                   "mergekit)")
        ->check(CLI::IsMember({"up", "balanced"}));
    app.add_option("--dtype", dtype, "dtype of the new factors: f32, f16 or bf16 (default: as the input)");
    app.add_option("--to", request.to, "output convention (default: the input's): peft, kohya, diffusers, mlx");
    app.add_flag("--dry-run", dry_run, "report the ranks and errors without writing anything");
    app.add_option("-j,--threads", request.options.threads, "worker threads (default: all cores)")->check(CLI::NonNegativeNumber);
    tool.add_force_option(request.force);
    tool.add_json_option(request.json, "print the per-module report as JSON on stdout");
    tool.add_verbosity_options();
    app.footer("Exit status: 0 ok, 2 usage error, 3 bad or unsupported input, 4 I/O error.");
    return tool.run(argc, argv, [&] {
        if (!dry_run && request.output.empty()) lorakit::fail(lorakit::ErrorCode::usage, "give -o OUT (or --dry-run)");
        if (dry_run) request.output.clear();
        request.options.rank = rank.finish();
        request.options.split = split == "balanced" ? lorakit::FactorSplit::balanced : lorakit::FactorSplit::up;
        if (!dtype.empty()) request.options.dtype = lorakit::cli::parse_output_dtype(dtype);
        return tool.finish(lorakit::run_resize(lorakit::formats::builtin_registry(), request, tool.progress()));
    });
}
