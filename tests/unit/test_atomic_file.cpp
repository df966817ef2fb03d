// Atomic output: data appears under the target name only on commit; failures, interrupts
// and kills leave nothing behind; existing files are replaced only when allowed.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

#include <fmt/format.h>

#include "lorakit/atomic_file.h"
#include "lorakit/error.h"
#include "lorakit/mapped_file.h"
#include "support.h"

using namespace lorakit;
using test::ScratchDir;

namespace {

std::span<const std::byte> bytes_of(const std::string& s) { return std::as_bytes(std::span(s.data(), s.size())); }

class NamedTempMode {
public:
    explicit NamedTempMode(bool on) {
        if (on) ::setenv("LORAKIT_ATOMIC_NAMED_TEMP", "1", 1);
        else ::unsetenv("LORAKIT_ATOMIC_NAMED_TEMP");
    }
    ~NamedTempMode() { ::unsetenv("LORAKIT_ATOMIC_NAMED_TEMP"); }
};

// Forks a child that starts writing `target` and reports when it is mid-write; the parent
// then sends `signal_number`. Returns the child's exit status (128 + signal).
int kill_mid_write(const std::filesystem::path& target, int signal_number) {
    return test::kill_when_ready(
        [&](const std::function<void()>& ready) {
            AtomicFile out(target, false);
            const std::string chunk(1 << 20, 'x');
            for (int i = 0; i < 5; ++i) out.write(bytes_of(chunk));
            ready();
            for (;;) {
                out.write(bytes_of(chunk));
                ::usleep(1000);
            }
        },
        signal_number);
}

}  // namespace

TEST_CASE("the output appears only on commit, with no temporary left", "[atomic]") {
    for (bool named : {false, true}) {
        NamedTempMode mode(named);
        ScratchDir dir;
        {
            AtomicFile out(dir / "out.bin", false);
            out.write(bytes_of("hello "));
            out.write(bytes_of("world"));
            CHECK(out.size() == 11);
            CHECK_FALSE(std::filesystem::exists(dir / "out.bin"));
            out.commit();
        }
        CHECK(test::read_file(dir / "out.bin") == "hello world");
        CHECK(dir.list() == std::vector<std::string>{"out.bin"});
    }
}

TEST_CASE("without the flush to disk (--no-sync), outputs still appear whole and only on commit", "[atomic]") {
    struct NoSync {
        NoSync() { lorakit::set_sync_outputs(false); }
        ~NoSync() { lorakit::set_sync_outputs(true); }
    } no_sync;
    CHECK_FALSE(lorakit::sync_outputs());
    for (bool named : {false, true}) {
        NamedTempMode mode(named);
        ScratchDir dir;
        const std::string big(65u << 20, 'x');  // past the 64 MiB writeback step
        {
            AtomicFile out(dir / "out.bin", false);
            out.write(big);
            out.write(bytes_of("end"));
            CHECK_FALSE(std::filesystem::exists(dir / "out.bin"));
            out.commit();
        }
        CHECK(test::read_file(dir / "out.bin") == big + "end");
        {
            AtomicDirectory out(dir / "model", false);
            AtomicFile& a = out.add("sub/a.json");
            a.write(std::string_view("{}"));
            a.commit();
            CHECK_FALSE(std::filesystem::exists(dir / "model"));
            out.commit();
        }
        CHECK(test::read_file(dir / "model" / "sub" / "a.json") == "{}");
        CHECK(dir.list() == std::vector<std::string>{"model", "out.bin"});
    }
}

TEST_CASE("bytes of a mapped input are copied file to file, at any offset, mixed with buffered ones", "[atomic]") {
    ScratchDir dir;
    std::string source(3u << 20, '\0');
    for (std::size_t i = 0; i < source.size(); ++i) source[i] = static_cast<char>((i * 2654435761u) >> 13);
    test::write_file(dir / "in.bin", source);
    auto in = MappedFile::open(dir / "in.bin");
    const std::span<const std::byte> all = in->bytes();
    // mapped_source finds the file and offset of a range inside the mapping, nothing outside it.
    const auto found = mapped_source(all.subspan(12345, 1000));
    REQUIRE(found);
    CHECK(found->offset == 12345);
    CHECK_FALSE(mapped_source(all.subspan(0, 0)));
    const std::string heap(100000, 'h');
    CHECK_FALSE(mapped_source(bytes_of(heap)));
    const auto copy = MappedFile::from_bytes("memory", all);
    CHECK_FALSE(mapped_source(copy->bytes()));
    for (bool named : {false, true}) {
        NamedTempMode mode(named);
        const std::filesystem::path target = dir / fmt::format("out-{}.bin", named);
        {
            AtomicFile out(target, false);
            out.write(bytes_of("head"));                      // buffered
            out.write(all.subspan(7, 1u << 20));              // copied, odd offset, after buffered bytes
            out.write(all.subspan(100, 10));                  // small: buffered
            out.write(all.subspan((2u << 20) + 3, 500000));   // copied again
            out.write(copy->bytes().subspan(1, 200000));      // not mapped: written
            CHECK(out.size() == 4 + (1u << 20) + 10 + 500000 + 200000);
            out.commit();
        }
        const std::string expected = "head" + source.substr(7, 1u << 20) + source.substr(100, 10) +
                                     source.substr((2u << 20) + 3, 500000) + source.substr(1, 200000);
        CHECK(test::read_file(target) == expected);
    }
    CHECK(test::read_file(dir / "in.bin") == source);  // the input is untouched
    // read_bytes: a mapped range (read with pread), memory elsewhere, nothing.
    for (auto [offset, length] : {std::pair<std::size_t, std::size_t>{0, 1}, {12345, 70000}, {(3u << 20) - 5, 5}}) {
        std::string got(length, '?');
        read_bytes(all.subspan(offset, length), reinterpret_cast<std::byte*>(got.data()));
        CHECK(got == source.substr(offset, length));
    }
    std::string got(5000, '?');
    read_bytes(copy->bytes().subspan(17, 5000), reinterpret_cast<std::byte*>(got.data()));
    CHECK(got == source.substr(17, 5000));
    read_bytes({}, nullptr);
    in.reset();  // unmapped: its range is no longer a source (only the address is compared)
    CHECK_FALSE(mapped_source(all.subspan(12345, 1000)));
}

TEST_CASE("an output abandoned before commit leaves nothing", "[atomic]") {
    for (bool named : {false, true}) {
        NamedTempMode mode(named);
        ScratchDir dir;
        {
            AtomicFile out(dir / "out.bin", false);
            out.write(bytes_of(std::string(5 << 20, 'y')));
        }
        CHECK(dir.list().empty());
    }
}

TEST_CASE("an existing output is replaced only when allowed", "[atomic]") {
    for (bool named : {false, true}) {
        NamedTempMode mode(named);
        ScratchDir dir;
        test::write_file(dir / "out.bin", "old");
        try {
            AtomicFile out(dir / "out.bin", false);
            FAIL("expected a refusal");
        } catch (const Error& e) {
            CHECK(e.code() == ErrorCode::usage);
            CHECK_THAT(e.what(), Catch::Contains("exists (use --force to replace it)"));
        }
        CHECK(test::read_file(dir / "out.bin") == "old");
        write_file_atomically(dir / "out.bin", bytes_of("new"), true);
        CHECK(test::read_file(dir / "out.bin") == "new");
        CHECK(dir.list() == std::vector<std::string>{"out.bin"});
    }
}

TEST_CASE("a target that appears while writing is not clobbered", "[atomic]") {
    for (bool named : {false, true}) {
        NamedTempMode mode(named);
        ScratchDir dir;
        AtomicFile out(dir / "out.bin", false);
        out.write(bytes_of("mine"));
        test::write_file(dir / "out.bin", "someone else's");
        CHECK_THROWS_AS(out.commit(), Error);
        CHECK(test::read_file(dir / "out.bin") == "someone else's");
    }
}

TEST_CASE("output paths that cannot work are refused up front", "[atomic]") {
    ScratchDir dir;
    try {
        check_output_path(dir / "missing" / "out.bin", false);
        FAIL("expected an error");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::io);
        CHECK_THAT(e.what(), Catch::Contains("does not exist"));
    }
    std::filesystem::create_directory(dir / "sub");
    try {
        check_output_path(dir / "sub", true);
        FAIL("expected an error");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::usage);
        CHECK_THAT(e.what(), Catch::Contains("is an existing directory"));
    }
}

TEST_CASE("an AtomicFile in a missing directory fails with an I/O error and creates nothing", "[atomic]") {
    for (bool named : {false, true}) {
        NamedTempMode mode(named);
        ScratchDir dir;
        try {
            AtomicFile out(dir / "missing" / "out.bin", false);
            FAIL("expected an error");
        } catch (const Error& e) {
            CHECK(e.code() == ErrorCode::io);
            CHECK_THAT(e.what(), Catch::Contains("missing") && Catch::Contains("does not exist"));
        }
        CHECK(dir.list().empty());
    }
}

TEST_CASE("a replaced file keeps its old contents until commit", "[atomic]") {
    for (bool named : {false, true}) {
        NamedTempMode mode(named);
        ScratchDir dir;
        test::write_file(dir / "out.bin", "old");
        {
            AtomicFile out(dir / "out.bin", true);
            out.write(bytes_of("new"));
            CHECK(test::read_file(dir / "out.bin") == "old");
        }  // abandoned: the old file stays
        CHECK(test::read_file(dir / "out.bin") == "old");
        CHECK(dir.list() == std::vector<std::string>{"out.bin"});
    }
}

TEST_CASE("large writes that bypass the buffer arrive intact", "[atomic]") {
    ScratchDir dir;
    std::string big(9 << 20, '\0');
    for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 2654435761u) >> 24);
    {
        AtomicFile out(dir / "big.bin", false);
        out.write(bytes_of(big.substr(0, 100)));     // buffered
        out.write(bytes_of(big.substr(100)));        // larger than the buffer
        out.commit();
    }
    CHECK(test::read_file(dir / "big.bin") == big);
}

TEST_CASE("the output gets the permissions of a normally created file", "[atomic]") {
    for (bool named : {false, true}) {
        for (mode_t mask : {mode_t(022), mode_t(077)}) {
            NamedTempMode mode(named);
            ScratchDir dir;
            const mode_t old = ::umask(mask);
            write_file_atomically(dir / "out.bin", bytes_of("x"), false);
            ::umask(old);
            struct stat st {};
            REQUIRE(::stat((dir / "out.bin").c_str(), &st) == 0);
            CHECK((st.st_mode & 0777) == (0666 & ~mask));
        }
    }
}

TEST_CASE("a writer killed with SIGKILL mid-write leaves no file at all", "[atomic]") {
    NamedTempMode mode(false);  // O_TMPFILE: the data never has a name until commit
    ScratchDir dir;
    CHECK(kill_mid_write(dir / "out.bin", SIGKILL) == 128 + SIGKILL);
    CHECK(dir.list().empty());
}

TEST_CASE("a writer interrupted by SIGTERM or SIGINT removes its named temporary", "[atomic]") {
    for (int sig : {SIGTERM, SIGINT}) {
        NamedTempMode mode(true);
        ScratchDir dir;
        CHECK(kill_mid_write(dir / "out.bin", sig) == 128 + sig);
        CHECK(dir.list().empty());
    }
}

TEST_CASE("an AtomicDirectory appears whole on commit, files in subfolders included", "[atomic]") {
    for (bool named : {false, true}) {
        NamedTempMode mode(named);
        ScratchDir dir;
        {
            AtomicDirectory out(dir / "model", false);
            AtomicFile& a = out.add("a.json");
            a.write(std::string_view("{}"));
            a.commit();
            AtomicFile& b = out.add("unet/b.bin");
            b.write(std::string_view("bytes"));
            b.commit();
            // Nothing has a name yet (the named-temporary fallback: hidden ones only).
            for (const auto& name : dir.list()) CHECK((named && name.starts_with(".")));
            if (!named) CHECK(dir.list().empty());
            out.commit();
        }
        CHECK(dir.list() == std::vector<std::string>{"model"});
        CHECK(test::read_file(dir / "model" / "a.json") == "{}");
        CHECK(test::read_file(dir / "model" / "unet" / "b.bin") == "bytes");
        // Replacing needs overwrite; a file added but not committed is a programming error.
        CHECK_THROWS_AS(AtomicDirectory(dir / "model", false), Error);
        {
            AtomicDirectory again(dir / "model", true);
            again.add("c.txt").write(std::string_view("c"));
            CHECK_THROWS_WITH(again.commit(), Catch::Contains("was not committed"));
        }
        CHECK(test::read_file(dir / "model" / "a.json") == "{}");
        {
            AtomicDirectory again(dir / "model", true);
            AtomicFile& c = again.add("c.txt");
            c.write(std::string_view("c"));
            c.commit();
            again.commit();
        }
        CHECK(std::filesystem::exists(dir / "model" / "c.txt"));
        CHECK_FALSE(std::filesystem::exists(dir / "model" / "a.json"));
        CHECK(dir.list() == std::vector<std::string>{"model"});
    }
}

TEST_CASE("an AtomicDirectory killed with SIGKILL mid-write leaves nothing at all", "[atomic]") {
    NamedTempMode mode(false);
    ScratchDir dir;
    const int ended = test::kill_when_ready(
        [&](const std::function<void()>& ready) {
            AtomicDirectory out(dir / "model", false);
            AtomicFile& first = out.add("shard-1.bin");
            first.write(std::string_view("done"));
            first.commit();
            AtomicFile& second = out.add("sub/shard-2.bin");
            const std::string chunk(1 << 20, 'x');
            second.write(bytes_of(chunk));
            ready();
            for (;;) {
                second.write(bytes_of(chunk));
                ::usleep(1000);
            }
        },
        SIGKILL);
    CHECK(ended == 128 + SIGKILL);
    CHECK(dir.list().empty());
}

TEST_CASE("hidden temporaries a killed run left are removed by the next run on that output", "[atomic]") {
    ScratchDir dir;
    // A pid that no longer exists: a child that has exited and been reaped.
    const pid_t gone = ::fork();
    if (gone == 0) ::_exit(0);
    ::waitpid(gone, nullptr, 0);
    std::filesystem::create_directory(dir / fmt::format(".model.lorakit-{}-abcd1234", gone));
    test::write_file(dir / fmt::format(".model.lorakit-{}-abcd1234", gone) / "x", "partial");
    test::write_file(dir / fmt::format(".out.bin.lorakit-{}-abcd1234", gone), "partial");
    // Kept: a live process's (this one's parent), another output's, and names of another shape.
    test::write_file(dir / fmt::format(".model.lorakit-{}-abcd1234", ::getppid()), "live");
    test::write_file(dir / fmt::format(".other.lorakit-{}-abcd1234", gone), "other output");
    test::write_file(dir / ".model.lorakit-abcd1234", "no pid");
    {
        AtomicDirectory out(dir / "model", false);
        AtomicFile& f = out.add("a");
        f.write(std::string_view("a"));
        f.commit();
        out.commit();
    }
    {
        AtomicFile out(dir / "out.bin", false);
        out.write(std::string_view("b"));
        out.commit();
    }
    CHECK(dir.list() == std::vector<std::string>{fmt::format(".model.lorakit-{}-abcd1234", ::getppid()), ".model.lorakit-abcd1234",
                                                 fmt::format(".other.lorakit-{}-abcd1234", gone), "model", "out.bin"});
}
