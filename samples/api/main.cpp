// A small program over lorakit's public API: load an adapter in whatever convention it is in,
// list its modules, resize it to rank 2 in memory and write it as a kohya or PEFT file.
//
//   lorakit-api-example ADAPTER OUTPUT
#include <cstdio>

#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/resize.h"
#include "lorakit/version.h"

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s ADAPTER OUTPUT\n", argv[0]);
        return 2;
    }
    try {
        const lorakit::Registry& registry = lorakit::formats::builtin_registry();
        const lorakit::Adapter adapter = registry.load_adapter(argv[1]);
        std::printf("lorakit %s: %s is a %s adapter with %zu modules\n", LORAKIT_VERSION_STRING, argv[1],
                    adapter.convention.c_str(), adapter.modules.size());
        for (const auto& m : adapter.modules)
            std::printf("  %s: rank %lld, %lld -> %lld, scale %g\n", m.name.c_str(), static_cast<long long>(m.rank()),
                        static_cast<long long>(m.in_features()), static_cast<long long>(m.out_features()), m.scale());
        lorakit::ResizeOptions options;
        options.rank.rank = 2;
        const lorakit::ResizeResult resized = lorakit::resize_adapter(adapter, options, lorakit::no_progress());
        std::vector<std::string> notes;
        registry.write_adapter(resized.adapter, adapter.convention, argv[2], lorakit::write_options(false), notes);
        std::printf("wrote %s at rank 2\n", argv[2]);
    } catch (const lorakit::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return lorakit::exit_code_for(e.code());
    }
    return 0;
}
