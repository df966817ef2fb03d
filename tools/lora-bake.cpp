// lora-bake: adapters merged into a base checkpoint.
#include "lorakit/bake.h"
#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "support/cli.h"
#include "support/options.h"

int main(int argc, char** argv) {
    lorakit::cli::Tool tool(
        "lora-bake",
        "Merge LoRA adapters into a base checkpoint: W' = W + sum w_i * scale_i * B_i A_i, accumulated in f32 and\n"
        "rounded once to the output dtype, one tensor at a time from the memory-mapped base (which is never modified).\n"
        "Tensors no adapter touches are copied byte for byte. DoRA modules are baked as PEFT merges them (magnitude\n"
        "renormalisation); LoRA biases go into the tensor's bias; LyCORIS full/norm diffs are added with the weight\n"
        "alone and PEFT modules_to_save replace the base's tensors. Bases: a safetensors file (SD/SDXL/Flux single files,\n"
        "transformers models), a transformers model folder or sharded checkpoint (written back as a folder with its\n"
        "config and tokenizer files, unless -o names a .safetensors file), a diffusers folder (written back as a\n"
        "folder: configs and tokenizers copied, other weight variants such as *.fp16.safetensors left out), or a GGUF\n"
        "model (llama.cpp names and q/k row order; changed Q8_0 tensors are requantized to Q8_0\n"
        "unless --dtype).");
    lorakit::BakeRequest request;
    std::string dtype = "keep", shard_size;
    auto& app = tool.app();
    app.add_option("base", request.base, "base checkpoint")->required()->type_name("BASE");
    app.add_option("adapters", request.adapters, "adapters, each optionally with its weight: PATH:W")
        ->required()->type_name("ADAPTER[:W]...");
    tool.add_output_option(request.output, "write the baked checkpoint to OUT (a directory when sharded)");
    app.add_option("--dtype", dtype,
                   "keep (default: every tensor its own dtype), f32, f16 or bf16 (all float tensors), or q8_0 (GGUF\n"
                   "bases: matrices to Q8_0 as llama.cpp's converter does; GGUF keeps norms and 1-D tensors F32 and\n"
                   "sets general.file_type)");
    app.add_option("--shard-size", shard_size, "write a sharded checkpoint with shards of at most SIZE (e.g. 5GB)");
    app.add_flag("--subtract", request.subtract, "remove previously baked adapters instead (W - sum)");
    app.add_flag("--allow-unmatched", request.allow_unmatched,
                 "skip adapter modules with no tensor in the base (a warning) instead of failing");
    app.add_option("-j,--threads", request.threads, "threads: one writes the output while the others compute the next\n"
                   "tensor; -j 1 does both on one (default: all cores)")->check(CLI::NonNegativeNumber);
    tool.add_force_option(request.force);
    tool.add_json_option(request.json, "print which tensors were changed by which modules, as JSON");
    tool.add_verbosity_options();
    app.footer("Exit status: 0 ok, 2 usage error, 3 bad or unsupported input (unmatched modules, shape mismatch,\n"
               "a result out of the dtype's range), 4 I/O error. A failed run leaves no output behind.");
    return tool.run(argc, argv, [&] {
        request.adapters = lorakit::cli::Tool::expand_argument_files(request.adapters);
        if (dtype == "q8_0" || dtype == "Q8_0") request.q8_0 = true;
        else if (dtype != "keep") request.dtype = lorakit::cli::parse_output_dtype(dtype);
        if (!shard_size.empty()) request.shard_size = lorakit::parse_size(shard_size);
        return tool.finish(lorakit::run_bake(lorakit::formats::builtin_registry(), request, tool.progress()));
    });
}
