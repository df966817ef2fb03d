#include "support/cli.h"

int main(int argc, char** argv) {
    lorakit::cli::Tool tool("lora-inspect", "Summarise LoRA adapters: convention, base model, ranks, norms, spectra.");
    return tool.run(argc, argv, [] { return 0; });
}
