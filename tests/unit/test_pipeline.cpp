// Outputs written while they are computed: deferred tensors (Tensor::deferred), the pipeline
// that makes them in the writer's order (lib/src/pipeline.h), the safetensors writer taking
// them, and lora-resize's streamed route against its eager one.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/merge.h"
#include "lorakit/resize.h"
#include "pipeline.h"
#include "support.h"

using namespace lorakit;
using lorakit::detail::TensorPipeline;

namespace {

// Group g's tensors: part p holds g * 10 + p in every element, `size` f32 values.
std::vector<Tensor> group_tensors(std::size_t g, std::size_t parts, std::int64_t size) {
    std::vector<Tensor> out;
    for (std::size_t p = 0; p < parts; ++p) {
        std::vector<float> v(static_cast<std::size_t>(size), static_cast<float>(g * 10 + p));
        out.push_back(Tensor::from_f32(DType::F32, {size}, v));
    }
    return out;
}

float first_value(const Tensor& t) { return t.to_f32().front(); }

// The same bytes in `a` and `b`: two files, or every file of two adapter directories.
void check_same_output(const std::filesystem::path& a, const std::filesystem::path& b) {
    if (!std::filesystem::is_directory(a)) {
        CHECK(test::read_file(a) == test::read_file(b));
        return;
    }
    for (const auto& entry : std::filesystem::directory_iterator(a))
        CHECK(test::read_file(entry.path()) == test::read_file(b / entry.path().filename()));
}

}  // namespace

TEST_CASE("TensorPipeline makes groups in the planned order, within the window", "[pipeline]") {
    const std::size_t groups = 60, window = 3;
    std::mutex mutex;
    std::vector<std::size_t> made_order;
    std::atomic<int> live{0}, most_live{0}, calls{0};
    auto pipeline = std::make_shared<TensorPipeline>(
        groups, 2,
        [&](std::size_t g) {
            ++calls;
            const int now = ++live;
            int seen = most_live.load();
            while (now > seen && !most_live.compare_exchange_weak(seen, now)) {}
            std::lock_guard lock(mutex);
            made_order.push_back(g);
            return group_tensors(g, 2, 16);
        },
        window);
    // The writer's order: the groups reversed, up (part 1) before down (part 0).
    std::vector<std::size_t> ids;
    for (std::size_t g = groups; g-- > 0;) ids.insert(ids.end(), {2 * g + 1, 2 * g});
    detail::write_while_made(*pipeline, 2, no_progress(), [&] {
        pipeline->plan(ids);
        for (std::size_t id : ids) {
            std::this_thread::sleep_for(std::chrono::microseconds(200));  // a slow writer
            const Tensor t = pipeline->take(id);
            CHECK(first_value(t) == static_cast<float>((id / 2) * 10 + id % 2));
            if (id % 2 == 0) --live;  // both parts taken
        }
    });
    CHECK(calls == static_cast<int>(groups));  // each group once
    CHECK(most_live <= static_cast<int>(window) + 1);  // the window, plus one the writer may claim
    // Workers claim in the planned order; a claimant descheduled between its claim and its make
    // lets the others make at most the rest of the window first.
    for (std::size_t i = 0; i < made_order.size(); ++i)
        CHECK(std::abs(static_cast<long>(made_order[i]) - static_cast<long>(groups - 1 - i)) <= static_cast<long>(window) + 1);
    for (std::size_t g = 0; g < groups; ++g) CHECK(pipeline->made(g));
}

TEST_CASE("TensorPipeline serves takes in any order, without a plan, and again", "[pipeline]") {
    for (const int threads : {1, 2, 3}) {
        INFO(threads);
        std::vector<std::atomic<int>> calls(20);
        TensorPipeline pipeline(
            20, 3,
            [&](std::size_t g) {
                ++calls[g];
                return group_tensors(g, 3, 5);
            },
            2);
        detail::write_while_made(pipeline, threads, no_progress(), [&] {
            // No plan: the first take sets the natural order; takes jump around it.
            for (std::size_t id : {31, 0, 59, 2, 1, 30, 32, 58, 57})
                CHECK(first_value(pipeline.take(id)) == static_cast<float>((id / 3) * 10 + id % 3));
            // A second take of an id makes its group again, for that take alone.
            CHECK(calls[10] == 1);
            CHECK(first_value(pipeline.take(31)) == 101.0f);
            CHECK(calls[10] == 2);
        });
        CHECK(pipeline.made(10));
        CHECK(pipeline.made(0));
    }
}

TEST_CASE("TensorPipeline failures reach the writer and win over its own error", "[pipeline]") {
    for (const int threads : {1, 2}) {
        INFO(threads);
        TensorPipeline pipeline(
            30, 2,
            [](std::size_t g) -> std::vector<Tensor> {
                if (g == 7) fail(ErrorCode::bad_input, "module 'seven': NaN or infinite values");
                return group_tensors(g, 2, 4);
            },
            2);
        try {
            detail::write_while_made(pipeline, threads, no_progress(), [&] {
                for (std::size_t id = 0; id < 60; ++id) (void)pipeline.take(id);
                FAIL("every take succeeded");
            });
            FAIL("no failure");
        } catch (const Error& e) {
            CHECK(e.code() == ErrorCode::bad_input);
            CHECK_THAT(e.what(), Catch::Contains("seven"));
        }
        CHECK(pipeline.failure() != nullptr);
    }
    // A writer failing on its own (nothing taken) stops the workers and its error comes out.
    TensorPipeline idle(5, 2, [](std::size_t g) { return group_tensors(g, 2, 4); }, 2);
    CHECK_THROWS_WITH(detail::write_while_made(idle, 2, no_progress(), [] { throw std::runtime_error("disk full"); }),
                      "disk full");
    // A writer that takes nothing and succeeds: run() returns.
    TensorPipeline unused(5, 2, [](std::size_t g) { return group_tensors(g, 2, 4); }, 2);
    detail::write_while_made(unused, 2, no_progress(), [] {});
    CHECK_FALSE(unused.made(0));
}

TEST_CASE("deferred tensors: made on first use, kept, reshaped; wrong sizes refused", "[pipeline]") {
    std::atomic<int> calls{0};
    auto source = std::make_shared<TensorPipeline>(
        2, 2,
        [&](std::size_t g) {
            ++calls;
            return group_tensors(g, 2, 6);
        },
        2);
    const Tensor t = Tensor::deferred(DType::F32, {2, 3}, source, 3);
    CHECK(t.deferred());
    CHECK_FALSE(t.empty());
    CHECK(t.element_count() == 6);
    CHECK(calls == 0);
    CHECK(t.to_f32() == std::vector<float>(6, 11.0f));  // group 1, part 1
    CHECK(calls == 1);
    CHECK(t.bytes().data() == t.bytes().data());  // kept: made once
    CHECK(t.reshaped({6}).to_f32() == std::vector<float>(6, 11.0f));
    CHECK(calls == 1);
    CHECK(first_value(t.deferred()->take()) == 11.0f);  // the kept copy, not made again
    CHECK(calls == 1);
    const Tensor wrong = Tensor::deferred(DType::F16, {2, 3}, source, 0);
    try {
        (void)wrong.bytes();
        FAIL("a tensor of the wrong dtype was accepted");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::internal);
    }
}

TEST_CASE("the safetensors writer takes deferred tensors in its layout order", "[pipeline][safetensors]") {
    // Tensors of two dtypes, some scaled (diffusers folds scales into B while writing): the file
    // written from deferred tensors equals the one written from the tensors themselves, with and
    // without kohya's data hash, and the source is told the layout order.
    const std::size_t groups = 12;
    auto make = [](std::size_t g) {
        std::vector<float> a(static_cast<std::size_t>(3 * (g + 2))), b(static_cast<std::size_t>(5 * 3));
        for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(g) + 0.25f * static_cast<float>(i);
        for (std::size_t i = 0; i < b.size(); ++i) b[i] = -static_cast<float>(g) - 0.5f * static_cast<float>(i);
        return std::vector<Tensor>{Tensor::from_f32(g % 2 ? DType::F16 : DType::F32, {3, static_cast<std::int64_t>(g + 2)}, a),
                                   Tensor::from_f32(DType::BF16, {5, 3}, b)};
    };
    std::vector<std::size_t> planned;
    struct Recording final : TensorMaker {
        TensorPipeline& inner;
        std::vector<std::size_t>& planned;
        Recording(TensorPipeline& p, std::vector<std::size_t>& out) : inner(p), planned(out) {}
        void plan(std::span<const std::size_t> ids) override {
            planned.assign(ids.begin(), ids.end());
            inner.plan(ids);
        }
        Tensor take(std::size_t id) override { return inner.take(id); }
    };
    for (const bool hash : {false, true}) {
        INFO(hash);
        TensorPipeline pipeline(groups, 2, make, 3);
        auto recording = std::make_shared<Recording>(pipeline, planned);
        std::vector<Tensor> keep;
        std::vector<formats::TensorToWrite> eager, deferred;
        for (std::size_t g = 0; g < groups; ++g) {
            const auto made = make(g);
            for (std::size_t p = 0; p < 2; ++p) {
                const std::string name = fmt::format("m{}.{}", g, p ? "up" : "down");
                const double scale = p == 1 && g % 3 == 0 ? 0.75 : 1.0;
                keep.push_back(made[p]);
                eager.push_back({name, keep.back().view(), scale});
                keep.push_back(Tensor::deferred(made[p].dtype(), made[p].shape(), recording, 2 * g + p));
                deferred.push_back({name, TensorView(made[p].dtype(), made[p].shape(), {}), scale, keep.back().deferred()});
            }
        }
        test::ScratchDir dir;
        const std::string key = hash ? "sshs_model_hash" : "";
        formats::write_safetensors(dir / "eager.safetensors", eager, {{"k", "v"}}, false, key);
        detail::write_while_made(pipeline, 2, no_progress(), [&] {
            formats::write_safetensors(dir / "deferred.safetensors", deferred, {{"k", "v"}}, false, key);
        });
        CHECK(test::read_file(dir / "deferred.safetensors") == test::read_file(dir / "eager.safetensors"));
        // Layout: F32 before BF16 before F16, by name within each.
        auto sorted = deferred;
        formats::sort_for_safetensors(sorted);
        std::vector<std::size_t> layout;
        for (const auto& t : sorted) layout.push_back(t.deferred->id());
        CHECK(planned == layout);
    }
}

TEST_CASE("lora-resize's streamed route writes what the eager one writes", "[pipeline][resize]") {
    const auto samples = std::filesystem::path(LORAKIT_SOURCE_DIR) / "samples";
    const Registry& registry = formats::builtin_registry();
    for (const char* input : {"peft-llama", "kohya-sdxl.safetensors", "diffusers-sd15.safetensors", "mlx-qwen"}) {
        const Adapter adapter = registry.load_adapter(samples / input);
        for (const int threads : {1, 2}) {
            INFO(input << " -j " << threads);
            test::ScratchDir dir;
            ResizeOptions options;
            options.rank.rank = 2;
            options.threads = threads;
            options.dtype = DType::F16;
            std::vector<std::string> notes;
            const ResizeResult eager = resize_adapter(adapter, options, no_progress());
            registry.write_adapter(eager.adapter, adapter.convention, dir / "eager", {}, notes);
            const auto streamed = resize_adapter_streamed(adapter, options, no_progress(), [&](const Adapter& a) {
                registry.write_adapter(a, adapter.convention, dir / "streamed", {}, notes);
            });
            REQUIRE(streamed);
            REQUIRE(streamed->modules.size() == eager.modules.size());
            for (std::size_t i = 0; i < eager.modules.size(); ++i) {
                CHECK(streamed->modules[i].choice.rank == eager.modules[i].choice.rank);
                CHECK(streamed->modules[i].choice.fro_retained == eager.modules[i].choice.fro_retained);
                CHECK(streamed->modules[i].unchanged == eager.modules[i].unchanged);
            }
            CHECK(streamed->notes == eager.notes);
            check_same_output(dir / "eager", dir / "streamed");
            // The returned adapter's factors are made again when read.
            CHECK(streamed->adapter.modules[0].down.to_f32() == eager.adapter.modules[0].down.to_f32());
        }
    }
    // Rules that read the spectra are not streamed.
    ResizeOptions dynamic;
    dynamic.rank.rule = RankRule::sv_fro;
    dynamic.rank.parameter = 0.9;
    bool called = false;
    CHECK_FALSE(resize_adapter_streamed(registry.load_adapter(samples / "peft-llama"), dynamic, no_progress(),
                                        [&](const Adapter&) { called = true; }));
    CHECK_FALSE(called);
}

TEST_CASE("lora-resize streamed: a bad module fails the run by its name and leaves no output", "[pipeline][resize][cli]") {
    test::ScratchDir dir;
    const auto samples = std::filesystem::path(LORAKIT_SOURCE_DIR) / "samples";
    // A kohya file whose fifth module's up holds a NaN (written through the real writer).
    const Registry& registry = formats::builtin_registry();
    Adapter adapter = registry.load_adapter(samples / "kohya-sdxl.safetensors");
    REQUIRE(adapter.modules.size() > 5);
    LoraModule& bad = adapter.modules[4];
    std::vector<float> up = bad.up.to_f32();
    up[1] = std::nanf("");
    bad.up = Tensor::from_f32(bad.up.dtype(), bad.up.shape(), up);
    std::vector<std::string> notes;
    registry.write_adapter(adapter, "kohya", dir / "bad.safetensors", {}, notes);
    for (const char* j : {"1", "2"}) {
        const auto r = test::run_tool("lora-resize", {(dir / "bad.safetensors").string(), "-o", (dir / "out.safetensors").string(),
                                                      "--rank", "2", "-j", j});
        CHECK(r.exit_code != 0);
        CHECK_THAT(r.err, Catch::Contains("NaN or infinite"));
        CHECK_THAT(r.err, Catch::Contains(bad.name) || Catch::Contains(bad.source_name));
        CHECK_THAT(r.err, !Catch::Contains("out.safetensors"));  // not the output's fault
        CHECK_FALSE(std::filesystem::exists(dir / "out.safetensors"));
        CHECK(dir.list() == std::vector<std::string>{"bad.safetensors"});  // no temporary file left behind
    }
}

TEST_CASE("lora-merge's streamed route writes what the eager one writes", "[pipeline][merge]") {
    const auto samples = std::filesystem::path(LORAKIT_SOURCE_DIR) / "samples";
    const Registry& registry = formats::builtin_registry();
    struct Case {
        MergeMethod method;
        MergeCompat compat;
        std::int64_t rank;
    };
    const Case cases[] = {{MergeMethod::concat, MergeCompat::lorakit, 0}, {MergeMethod::cat, MergeCompat::lorakit, 0},
                          {MergeMethod::svd, MergeCompat::lorakit, 3},    {MergeMethod::svd, MergeCompat::lorakit, 0},
                          {MergeMethod::svd, MergeCompat::kohya, 3},      {MergeMethod::concat, MergeCompat::kohya, 0},
                          {MergeMethod::linear, MergeCompat::kohya, 0}};
    for (const char* input : {"peft-llama", "kohya-sdxl.safetensors"}) {
        const Adapter first = registry.load_adapter(samples / input);
        Adapter second = first;  // without its first module: merged from the first input alone
        second.modules.erase(second.modules.begin());
        for (const auto& c : cases) {
            INFO(input << " " << merge_method_name(c.method) << " compat " << static_cast<int>(c.compat) << " rank " << c.rank);
            MergeOptions options;
            options.method = c.method;
            options.compat = c.compat;
            options.rank.rank = c.rank;
            options.weights = {0.7, -0.3};
            options.threads = 2;
            test::ScratchDir dir;
            std::vector<std::string> notes;
            const MergeResult eager = merge_adapters({first, second}, options, no_progress());
            registry.write_adapter(eager.adapter, first.convention, dir / "eager", {}, notes);
            const auto streamed = merge_adapters_streamed({first, second}, options, no_progress(), [&](const Adapter& a) {
                registry.write_adapter(a, first.convention, dir / "streamed", {}, notes);
            });
            REQUIRE(streamed);
            REQUIRE(streamed->modules.size() == eager.modules.size());
            for (std::size_t i = 0; i < eager.modules.size(); ++i) {
                CHECK(streamed->modules[i].rank == eager.modules[i].rank);
                CHECK(streamed->modules[i].inputs == eager.modules[i].inputs);
                CHECK(streamed->modules[i].relative_error == eager.modules[i].relative_error);
            }
            CHECK(streamed->notes == eager.notes);
            check_same_output(dir / "eager", dir / "streamed");
        }
    }
    // Methods whose ranks are not known beforehand are not streamed.
    MergeOptions ties;
    ties.method = MergeMethod::ties;
    ties.density = 0.5;
    const Adapter llama = registry.load_adapter(samples / "peft-llama");
    CHECK_FALSE(merge_adapters_streamed({llama, llama}, ties, no_progress(), [](const Adapter&) { FAIL("written"); }));
}

TEST_CASE("a streamed result's deferred factors can be read on several threads at once", "[pipeline][resize]") {
    const auto samples = std::filesystem::path(LORAKIT_SOURCE_DIR) / "samples";
    const Adapter adapter = formats::builtin_registry().load_adapter(samples / "peft-llama");
    ResizeOptions options;
    options.rank.rank = 2;
    const ResizeResult eager = resize_adapter(adapter, options, no_progress());
    const auto streamed = resize_adapter_streamed(adapter, options, no_progress(), [](const Adapter&) {});
    REQUIRE(streamed);
    // Nothing was written, so every module is made again here, down and up on different threads.
    std::vector<std::thread> readers;
    std::vector<std::vector<float>> values(2 * eager.adapter.modules.size());
    for (int part = 0; part < 2; ++part)
        readers.emplace_back([&, part] {
            for (std::size_t i = 0; i < eager.adapter.modules.size(); ++i) {
                const LoraModule& m = streamed->adapter.modules[i];
                values[2 * i + static_cast<std::size_t>(part)] = (part ? m.up : m.down).to_f32();
            }
        });
    for (auto& t : readers) t.join();
    for (std::size_t i = 0; i < eager.adapter.modules.size(); ++i) {
        CHECK(values[2 * i] == eager.adapter.modules[i].down.to_f32());
        CHECK(values[2 * i + 1] == eager.adapter.modules[i].up.to_f32());
        CHECK(streamed->modules[i].choice.rank == eager.modules[i].choice.rank);
    }
}
