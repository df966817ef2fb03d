// PyTorch zip checkpoints: the real files in the test data (values checked against an
// independent Python decode), hand-built archives for every feature the reader supports, and
// one rejection test per rule (nothing is ever executed: foreign globals are refused by name).
#include <catch2/catch.hpp>

#include <cstring>

#include "../../formats/src/pytorch_pickle.h"
#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/sha256.h"
#include "support.h"

using namespace lorakit;
using namespace lorakit::formats;

namespace {

// ---- a minimal stored-only zip writer and pickle builder ---------------------------------------

std::string u16(std::uint32_t v) { return {static_cast<char>(v & 0xff), static_cast<char>((v >> 8) & 0xff)}; }
std::string u32(std::uint32_t v) { return u16(v & 0xffff) + u16(v >> 16); }

std::string zip(const std::vector<std::pair<std::string, std::string>>& files, std::uint16_t method = 0) {
    std::string out, central;
    for (const auto& [name, data] : files) {
        const auto offset = static_cast<std::uint32_t>(out.size());
        out += u32(0x04034b50) + u16(20) + u16(0) + u16(method) + u16(0) + u16(0) + u32(0) +
               u32(static_cast<std::uint32_t>(data.size())) + u32(static_cast<std::uint32_t>(data.size())) +
               u16(static_cast<std::uint32_t>(name.size())) + u16(0) + name + data;
        central += u32(0x02014b50) + u16(20) + u16(20) + u16(0) + u16(method) + u16(0) + u16(0) + u32(0) +
                   u32(static_cast<std::uint32_t>(data.size())) + u32(static_cast<std::uint32_t>(data.size())) +
                   u16(static_cast<std::uint32_t>(name.size())) + u16(0) + u16(0) + u16(0) + u16(0) + u32(0) + u32(offset) +
                   name;
    }
    const auto cd_offset = static_cast<std::uint32_t>(out.size());
    out += central;
    out += u32(0x06054b50) + u16(0) + u16(0) + u16(static_cast<std::uint32_t>(files.size())) +
           u16(static_cast<std::uint32_t>(files.size())) + u32(static_cast<std::uint32_t>(central.size())) + u32(cd_offset) + u16(0);
    return out;
}

struct P {
    std::string s = "\x80\x02";
    P& op(std::string_view o) {
        s += o;
        return *this;
    }
    P& str(std::string_view t) {
        s += 'X';
        s += u32(static_cast<std::uint32_t>(t.size()));
        s += t;
        return *this;
    }
    P& global(std::string_view module, std::string_view name) {
        s += 'c';
        s += module;
        s += '\n';
        s += name;
        s += '\n';
        return *this;
    }
    P& int1(std::uint8_t v) {
        s += 'K';
        s += static_cast<char>(v);
        return *this;
    }
    P& ints(std::initializer_list<std::int64_t> v) {
        s += '(';
        for (auto x : v) {
            if (x >= 0 && x < 256) {
                int1(static_cast<std::uint8_t>(x));
                continue;
            }
            s += "\x8a\x08";  // LONG1 of 8 little-endian bytes
            for (int b = 0; b < 8; ++b) s += static_cast<char>((static_cast<std::uint64_t>(x) >> (8 * b)) & 0xff);
        }
        s += 't';
        return *this;
    }
    // _rebuild_tensor_v2(storage(key, numel), offset, size, stride, False, OrderedDict())
    P& tensor(std::string_view key, std::uint8_t numel, std::uint8_t offset, std::initializer_list<std::int64_t> size,
              std::initializer_list<std::int64_t> stride, std::string_view storage = "FloatStorage") {
        global("torch._utils", "_rebuild_tensor_v2");
        s += "((";
        str("storage").global("torch", storage).str(key).str("cpu").int1(numel);
        s += "tQ";
        int1(offset).ints(size).ints(stride);
        s += '\x89';
        global("collections", "OrderedDict");
        s += ")Rt";
        s += 'R';
        return *this;
    }
    std::string done() { return s + "."; }
};

std::string floats(std::initializer_list<float> v) {
    std::string out(v.size() * 4, '\0');
    std::memcpy(out.data(), std::data(v), out.size());
    return out;
}

std::unique_ptr<TensorFile> open_bytes(const std::string& bytes, std::string name = "x.bin") {
    return read_pytorch_pickle(
        MappedFile::from_bytes(std::move(name), std::as_bytes(std::span(bytes.data(), bytes.size()))));
}

void expect_error(const std::string& bytes, const std::string& fragment, ErrorCode code = ErrorCode::bad_input) {
    INFO("expecting: " << fragment);
    try {
        open_bytes(bytes);
        FAIL("accepted");
    } catch (const Error& e) {
        CHECK(e.code() == code);
        CHECK_THAT(e.what(), Catch::Contains(fragment));
    }
}

// A checkpoint {"a": [2,3] contiguous, "b": its transpose (a strided view), "nested": {"c":
// Parameter([2]) at offset 4}, "step": 5, "note": "hi"} over one storage of 6 floats.
std::string sample_pickle() {
    P p;
    p.op("}(");
    p.str("a").tensor("0", 6, 0, {2, 3}, {3, 1});
    p.str("b").tensor("0", 6, 0, {3, 2}, {1, 3});
    p.str("nested").op("}").str("c");
    p.global("torch._utils", "_rebuild_parameter").op("(");
    p.tensor("0", 6, 4, {2}, {1});
    p.op("\x88").global("collections", "OrderedDict").op(")Rt").op("R").op("s");
    p.str("step").int1(5).str("note").str("hi").op("u");
    return p.done();
}

std::string sample_archive(const std::string& pickle) {
    return zip({{"archive/data.pkl", pickle}, {"archive/byteorder", "little"}, {"archive/data/0", floats({1, 2, 3, 4, 5, 6})},
                {"archive/version", "3\n"}});
}

}  // namespace

TEST_CASE("pickle: a hand-built checkpoint: contiguous and strided tensors, parameters, nesting, metadata", "[pickle]") {
    const auto file = open_bytes(sample_archive(sample_pickle()));
    REQUIRE(file->entries().size() == 3);
    CHECK(file->entries()[0].name == "a");
    CHECK(file->entries()[0].shape == Shape{2, 3});
    CHECK(file->entries()[0].to_f32() == std::vector<float>{1, 2, 3, 4, 5, 6});
    CHECK(file->entries()[1].name == "b");
    CHECK(file->entries()[1].to_f32() == std::vector<float>{1, 4, 2, 5, 3, 6});
    CHECK(file->entries()[2].name == "nested.c");
    CHECK(file->entries()[2].to_f32() == std::vector<float>{5, 6});
    CHECK(file->metadata().at("step") == "5");
    CHECK(file->metadata().at("note") == "hi");
    CHECK(file->metadata().at("pytorch.archive_version") == "3");
    CHECK(file->format_name() == "pytorch-pickle");
}

TEST_CASE("pickle: every rule of the reader, each with its message", "[pickle][malformed]") {
    const std::string good = sample_pickle();
    auto with_pickle = [](const std::string& p) { return sample_archive(p); };
    // Foreign globals are refused by name before anything else happens.
    {
        P p;
        p.global("os", "system").str("echo").op("\x85R");
        expect_error(with_pickle(p.done()), "refusing global os.system", ErrorCode::unsupported);
    }
    {
        P p;
        p.str("builtins").str("eval").op("\x93");
        expect_error(with_pickle(p.done()), "refusing global builtins.eval", ErrorCode::unsupported);
    }
    expect_error(with_pickle(P().op("}").op("\x81").done()), "opcode 0x81", ErrorCode::unsupported);
    expect_error(with_pickle(P().op("}").op("s").done()), "stack underflow");
    expect_error(with_pickle(P().op("}h\x07").done()), "memo entry 7 was never stored");
    expect_error(with_pickle(P().op("}").done().substr(0, 3)), "pickle ends without STOP");
    expect_error(with_pickle(P().op("}}").done()), "values left on the stack");
    expect_error(with_pickle(P().op("]").done()), "holds a list, not a state dict");
    expect_error(with_pickle(P().op("}u").done()), "no MARK");
    expect_error(with_pickle(P().op("}(").str("a").op("u").done()), "odd number");
    {
        P p;
        p.op("}").str("a").tensor("0", 6, 4, {2, 3}, {3, 1}).op("s");
        expect_error(with_pickle(p.done()), "reaches element 9 of a storage of 6");
    }
    {
        // Regression: an empty tensor's other sizes are bounded too (code downstream
        // multiplies them in int64).
        P p;
        p.op("}").str("a").tensor("0", 6, 0, {0, std::int64_t{1} << 40, std::int64_t{1} << 40}, {1, 1, 1}).op("s");
        expect_error(with_pickle(p.done()), "too many elements");
        P q;
        q.op("}").str("a").tensor("0", 6, 0, {0, std::int64_t{1} << 50}, {1, 1}).op("s");
        expect_error(with_pickle(q.done()), "implausible size or stride");
        // Regression (UBSan in CI): sizes and strides each plausible, their products not.
        P s;
        s.op("}").str("a").tensor("0", 6, 0, {std::int64_t{1} << 20, std::int64_t{1} << 20, std::int64_t{1} << 20},
                                  {1, 1, 1}).op("s");
        expect_error(with_pickle(s.done()), "too many elements");
        P t;
        t.op("}").str("a").tensor("0", 6, 0, {1 << 16, 1 << 16, 1 << 16}, {std::int64_t{1} << 47, std::int64_t{1} << 47,
                                                                          std::int64_t{1} << 47}).op("s");
        expect_error(with_pickle(t.done()), "64-bit offsets");
    }
    {
        P p;
        p.op("}").str("a").tensor("0", 9, 0, {3, 3}, {3, 1}).op("s");
        expect_error(with_pickle(p.done()), "holds 24 bytes, not 9 elements");
    }
    {
        P p;
        p.op("}").str("a").tensor("7", 2, 0, {2}, {1}).op("s");
        expect_error(with_pickle(p.done()), "storage '7' is not in the archive");
    }
    {
        P p;
        p.op("}").str("a").tensor("0", 6, 0, {2}, {1}, "QuantizedStorage").op("s");
        expect_error(with_pickle(p.done()), "refusing global torch.QuantizedStorage", ErrorCode::unsupported);
    }
    {
        P p;
        p.op("}(").str("a").tensor("0", 6, 0, {2}, {1}).str("a").tensor("0", 6, 0, {2}, {1}).op("u");
        expect_error(with_pickle(p.done()), "duplicate tensor name 'a'");
    }
    // Regression (found by fuzzing): a dict that holds itself is a cycle; it must neither leak
    // (the sanitizer build checks) nor recurse without end.
    expect_error(with_pickle(P().op(std::string_view("}q\0", 3)).str("self").op(std::string_view("h\0s", 3)).done()),
                 "nested more than 8 levels",
                 ErrorCode::unsupported);
    // The archive.
    expect_error(zip({{"archive/other", "x"}}), "without <name>/data.pkl");
    expect_error(zip({{"archive/data.pkl", good}}, 8), "compressed", ErrorCode::unsupported);
    expect_error(zip({{"archive/data.pkl", good}, {"archive/byteorder", "big"}, {"archive/data/0", floats({1, 2, 3, 4, 5, 6})}}),
                 "a big-endian checkpoint", ErrorCode::unsupported);
    {
        std::string z = sample_archive(good);
        expect_error(z.substr(0, z.size() - 30), "no end-of-central-directory record");
        std::string bad_cd = z;
        bad_cd[bad_cd.size() - 3] = '\x7f';  // the central directory offset's high byte
        expect_error(bad_cd, "truncated in the central directory");
        std::string shifted = z;
        shifted[shifted.size() - 6] = static_cast<char>(shifted[shifted.size() - 6] + 1);
        expect_error(shifted, "bad zip central directory entry 0");
    }
    expect_error("\x80\x02}.", "legacy (pre-zip)", ErrorCode::unsupported);
    expect_error("PK\x03\x04", "too short for a zip archive");
}

TEST_CASE("pickle: the real torch.save files in the test data", "[pickle]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const auto dir = test::real_testdata_dir();
    // Values from an independent decode (Python's pickle with numpy, not lorakit).
    const auto file = read_pytorch_pickle(MappedFile::open(dir / "diffusers-sd15-catundchat/pytorch_lora_weights.bin"));
    REQUIRE(file->entries().size() == 256);
    struct Expected {
        std::string name;
        Shape shape;
        std::string sha256;
    };
    const Expected expected[] = {
        {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight", {4, 320},
         "2fc1fc22ee7dffe40a31ab6821d317ff8fe8b6c990b624addb64927133634990"},
        {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight", {320, 4},
         "2a391c8a9bd3a6476e94f657b3b44980b89c525e86918b928156c16d1643666d"},
        {"mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight", {1280, 4},
         "159e50226f286185850be5a02a141f9e624082b62cbe3393a0872022b9b341df"},
    };
    for (const auto& e : expected) {
        INFO(e.name);
        const TensorEntry* entry = file->find(e.name);
        REQUIRE(entry != nullptr);
        CHECK(entry->shape == e.shape);
        CHECK(entry->dtype_name == "F32");
        CHECK(sha256_hex(entry->tensor.bytes()) == e.sha256);
    }
    CHECK(file->entries().front().name == expected[0].name);
    CHECK(file->entries().back().name == expected[2].name);
    // The adapter reads like a safetensors one: the old diffusers attention-processor layout.
    const Adapter adapter = builtin_registry().load_adapter(dir / "diffusers-sd15-catundchat/pytorch_lora_weights.bin");
    CHECK(adapter.convention == "diffusers");
    CHECK(adapter.container == "pytorch-pickle");
    CHECK(adapter.modules.size() == 128);

    // Its safetensors "twin" has the same keys, shapes and dtypes; the values are those of a
    // different training run (an independent decode finds 0 of 256 tensors equal, correlation
    // about 0), so values are checked against the decode above instead.
    const auto twin = builtin_registry().open_tensor_file(dir / "diffusers-sd15-catundchat/pytorch_lora_weights.safetensors");
    REQUIRE(twin->entries().size() == file->entries().size());
    for (const auto& e : twin->entries()) {
        const TensorEntry* mine = file->find(e.name);
        REQUIRE(mine != nullptr);
        CHECK(mine->shape == e.shape);
        CHECK(mine->dtype_name == e.dtype_name);
    }

    // The PEFT prefix-tuning checkpoint: the container reads, the adapter type is refused.
    const auto prefix = read_pytorch_pickle(MappedFile::open(dir / "peft-prefix-chatglm-langchain-chatchat/adapter_model.bin"));
    REQUIRE(prefix->entries().size() == 1);
    CHECK(prefix->entries()[0].name == "prompt_encoder.embedding.weight");
    CHECK(prefix->entries()[0].shape == Shape{8, 229376});
    CHECK(prefix->entries()[0].dtype_name == "F16");
    CHECK(sha256_hex(prefix->entries()[0].tensor.bytes()) ==
          "642ba36b78e3341a9a8493593f06780d7fd6d993bbbbb3a79d36d083b2298e1b");
    try {
        builtin_registry().load_adapter(dir / "peft-prefix-chatglm-langchain-chatchat");
        FAIL("accepted");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::unsupported);
        CHECK_THAT(e.what(), Catch::Contains("PREFIX_TUNING"));
    }
}
