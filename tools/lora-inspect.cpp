// lora-inspect: what is in a LoRA adapter. Parses options and calls lorakit::run_inspect.
#include "lorakit/formats/builtin.h"
#include "lorakit/inspect.h"
#include "support/cli.h"

int main(int argc, char** argv) {
    lorakit::cli::Tool tool("lora-inspect",
                            "Summarise LoRA adapters: key convention, base model, ranks, alphas and scales, and per-module\n"
                            "norms and singular spectra of dW = scale * B*A, computed from the factors.\n"
                            "Inputs are weights files or adapter directories (PEFT, mlx-lm, diffusers); '-' reads stdin,\n"
                            "@LIST reads input paths from the file LIST, one per line.");
    lorakit::InspectRequest request;
    std::vector<std::string> inputs;
    bool no_spectra = false;
    auto& app = tool.app();
    app.add_option("inputs", inputs, "adapter files or directories")->required()->type_name("FILE|DIR...");
    tool.add_json_option(request.json, "print one JSON object per input (an array for several) on stdout");
    app.add_flag("--modules", request.modules, "add a per-module table to the text report");
    app.add_flag("--check", request.check,
                 "exit with status 1 when any value is NaN/Inf or the adapter is inconsistent\n"
                 "(config or metadata disagreeing with the tensors, keys no loader uses)");
    app.add_flag("--raw", request.raw, "list the tensors of any safetensors file, LoRA or not");
    app.add_flag("--no-spectra", no_spectra, "skip norms and singular values (shapes and counts only)");
    app.add_option("-j,--threads", request.options.threads, "worker threads (default: all cores)")->check(CLI::NonNegativeNumber);
    tool.add_verbosity_options();
    app.footer("Exit status: 0 ok, 1 check failed, 2 usage error, 3 bad or unsupported input, 4 I/O error.");
    return tool.run(argc, argv, [&] {
        request.inputs = lorakit::cli::Tool::expand_argument_files(inputs);
        request.options.spectra = !no_spectra;
        return tool.finish(lorakit::run_inspect(lorakit::formats::builtin_registry(), request, tool.progress()));
    });
}
