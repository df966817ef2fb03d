// lora-convert: rewrite an adapter in another convention, exactly.
#include "lorakit/convert.h"
#include "lorakit/formats/builtin.h"
#include "support/cli.h"

int main(int argc, char** argv) {
    lorakit::cli::Tool tool(
        "lora-convert",
        "Convert a LoRA adapter between conventions: peft (directory), kohya, diffusers, mlx (directory),\n"
        "gguf (llama.cpp), and the input's own. Every module keeps the scale it applies: where the target\n"
        "has one alpha per file (gguf) or none (diffusers), per-module differences (rank_pattern, alpha_pattern,\n"
        "rsLoRA, mlx scale) are folded into B, and a note says so. For arch llama, llama.cpp stores q/k LoRA\n"
        "rows in rotary order: converting to or from gguf needs the head counts (--head-count, --head-count-kv,\n"
        "or --base with the model's config.json or GGUF). LyCORIS modules become LoRAs with --rank N.");
    lorakit::ConvertRequest request;
    auto& app = tool.app();
    app.add_option("input", request.input, "adapter file or directory")->required()->type_name("IN");
    tool.add_output_option(request.output, "write the converted adapter to OUT (a directory for peft and mlx)");
    app.add_option("--to", request.to,
                   "target convention: peft, kohya, diffusers, mlx, gguf (default: the input's, or from OUT's name:\n"
                   "*.gguf is gguf, a name ending in / is peft)")
        ->check(CLI::IsMember({"peft", "kohya", "diffusers", "mlx", "gguf", "cloneofsimo"}));
    app.add_option("--dtype", request.dtype, "factor dtype: f32, f16, bf16, or q8_0 (gguf only; default: as the input)")
        ->check(CLI::IsMember({"f32", "f16", "bf16", "q8_0"}));
    app.add_option("--arch", request.hints.arch, "llama.cpp architecture of the base model (llama, qwen2, qwen3, gemma, ...)");
    app.add_option("--head-count", request.hints.head_count, "attention heads of the base model")->check(CLI::PositiveNumber);
    app.add_option("--head-count-kv", request.hints.head_count_kv, "key/value heads (default: --head-count)")
        ->check(CLI::PositiveNumber);
    app.add_option("--base", request.base, "the base model's config.json (or its directory) or GGUF, for the values above")
        ->type_name("FILE");
    app.add_option("--rank", request.rank,
                   "re-factor LyCORIS modules (LoHa, LoKr, full/diff, LoCon-Tucker) into LoRAs of this rank by SVD,\n"
                   "printing each module's relative error (needed when the target cannot hold LyCORIS)")
        ->type_name("N")
        ->check(CLI::PositiveNumber);
    app.add_flag("--allow-lossy", request.allow_lossy,
                 "write what the target can hold when it cannot hold everything, with a note for each loss: DoRA\n"
                 "magnitudes, LoRA biases, non-LoRA tensors (e.g. textual-inversion embeddings), LyCORIS modules\n"
                 "without --rank are left out; a --dtype cast saturates values beyond the dtype's range (without\n"
                 "this flag such conversions are refused, saying what would be lost)");
    tool.add_force_option(request.force);
    tool.add_json_option(request.json, "print a JSON report on stdout");
    tool.add_verbosity_options();
    app.footer("Exit status: 0 ok, 2 usage error, 3 bad or unsupported input, 4 I/O error.");
    return tool.run(argc, argv, [&] {
        if (request.output.empty()) lorakit::fail(lorakit::ErrorCode::usage, "give -o OUT");
        return tool.finish(lorakit::run_convert(lorakit::formats::builtin_registry(), request, tool.progress()));
    });
}
