// Writing an output file atomically: the data goes to an unnamed temporary file in the
// target's directory (O_TMPFILE; a hidden named temporary where the file system lacks it),
// is flushed to disk, and only then appears under the target name. A failed, interrupted or
// killed run leaves no output behind, and an existing file is replaced only when allowed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lorakit {

// Throws ErrorCode::usage when `target` exists and `overwrite` is false, and ErrorCode::io
// when its directory does not exist. Tools call this before doing any work.
void check_output_path(const std::filesystem::path& target, bool overwrite);

// Whether outputs are flushed to disk before they get their name (the default). Turned off
// (the tools' --no-sync, or LORAKIT_NO_SYNC=1) for scratch outputs a pipeline can rebuild: the
// rename is still atomic, so a failed or killed run leaves nothing behind either way, but after
// a power loss or an OS crash a just-written output may be empty or partial. Process-wide.
void set_sync_outputs(bool sync) noexcept;
bool sync_outputs() noexcept;

class AtomicFile {
public:
    // "-" writes to standard output directly (nothing to make atomic).
    AtomicFile(std::filesystem::path target, bool overwrite);
    ~AtomicFile();  // discards the data unless commit() succeeded
    AtomicFile(const AtomicFile&) = delete;
    AtomicFile& operator=(const AtomicFile&) = delete;

    void write(std::span<const std::byte> bytes);
    void write(std::string_view text) { write(std::as_bytes(std::span(text.data(), text.size()))); }
    // Bytes written so far.
    std::uint64_t size() const noexcept { return written_; }
    // Whether patch() works (not on standard output).
    bool patchable() const noexcept { return !to_stdout_; }
    // Overwrites bytes already written at `offset` (e.g. a header field known only after the
    // data, such as a hash of it). The range must lie within size().
    void patch(std::uint64_t offset, std::span<const std::byte> bytes);
    // Flushes, syncs and moves the file into place. Throws io on failure (nothing is left).
    void commit();

    const std::filesystem::path& target() const noexcept { return target_; }

private:
    friend class AtomicDirectory;
    struct Staged {};
    // A file of an AtomicDirectory: unnamed in `scratch` until the directory places it.
    AtomicFile(std::filesystem::path description, const std::filesystem::path& scratch, Staged);
    void open_temporary(const std::filesystem::path& dir);
    void place(const std::filesystem::path& path);  // links the committed data at `path`

    void flush_buffer();
    void raw_write(const std::byte* data, std::size_t size);
    std::size_t copy_mapped(std::span<const std::byte> bytes);
    void start_writeback() noexcept;
    void discard() noexcept;

    std::filesystem::path target_;
    bool overwrite_;
    int fd_ = -1;
    bool to_stdout_ = false;
    bool anonymous_ = false;  // O_TMPFILE
    bool staged_ = false;     // part of an AtomicDirectory: commit() syncs, the directory places it
    bool synced_ = false;
    std::string temp_path_;   // the named temporary when not anonymous
    std::unique_ptr<std::byte[]> buffer_;
    std::size_t capacity_ = 0;
    std::size_t buffered_ = 0;
    std::uint64_t written_ = 0;
    std::uint64_t flushed_ = 0;         // bytes handed to the kernel
    bool copy_range_ok_ = true;  // copy_file_range works between the inputs and this file
    std::uint64_t writeback_from_ = 0;  // start of the range whose writeback was not yet started
    bool committed_ = false;
};

// An output directory (PEFT and mlx-lm adapters, sharded checkpoints, diffusers folders). Its
// files are written as unnamed files beside the target (O_TMPFILE) and get names only in
// commit(), which links them into a fresh hidden directory and renames that into place: a
// failed run leaves nothing behind, and so does a killed one, except when SIGKILL lands in the
// few system calls of commit() itself (or with the named-temporary fallback): then a hidden
// ".NAME.lorakit-PID-*" is left, which the next run writing NAME removes once PID is gone. A
// replaced directory is swapped out and deleted only after the new one is in place.
class AtomicDirectory {
public:
    AtomicDirectory(std::filesystem::path target, bool overwrite);
    ~AtomicDirectory();
    AtomicDirectory(const AtomicDirectory&) = delete;
    AtomicDirectory& operator=(const AtomicDirectory&) = delete;

    // A new file at `relative` (a path inside the directory; subdirectories are created).
    // Write it, then commit() it; it appears with the directory.
    AtomicFile& add(const std::string& relative);
    // Every added file must have been committed.
    void commit();

private:
    std::filesystem::path target_;
    std::filesystem::path temp_;
    bool overwrite_;
    bool committed_ = false;
    std::vector<std::pair<std::string, std::unique_ptr<AtomicFile>>> files_;
};

// Writes `bytes` to `target` atomically in one call.
void write_file_atomically(const std::filesystem::path& target, std::span<const std::byte> bytes, bool overwrite);

}  // namespace lorakit
