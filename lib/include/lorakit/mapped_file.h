// Read-only access to a whole input file: memory-mapped for regular files, read into memory
// for standard input ("-"). Inputs are opened read-only and never modified.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>

namespace lorakit {

class MappedFile {
public:
    // Opens `path` ("-" reads standard input to its end). Throws ErrorCode::io when the file
    // cannot be opened or read, and ErrorCode::bad_input for a directory or a special file.
    static std::shared_ptr<const MappedFile> open(const std::filesystem::path& path);
    // A file-like object over bytes already in memory (tests, fuzzers, generated data).
    static std::shared_ptr<const MappedFile> from_bytes(std::string display_name, std::span<const std::byte> bytes);

    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;

    std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
    std::size_t size() const noexcept { return size_; }
    // The name used in messages (the path as given, or "<stdin>").
    const std::string& name() const noexcept { return name_; }
    const std::filesystem::path& path() const noexcept { return path_; }

    // Reads [offset, offset + length) from the disk into the page cache now, waiting for it
    // (madvise POPULATE_READ, then DONTNEED, chunk by chunk, so the resident set does not grow;
    // where the kernel lacks POPULATE_READ, before Linux 5.14, the WILLNEED hint): for a thread
    // that reads ahead of the work, so that the workers find the pages in memory. No-op for
    // in-memory data.
    void prefetch(std::size_t offset, std::size_t length) const noexcept;
    // Drops the whole pages of `bytes` (a range inside this file's mapping) from the process's
    // memory once they have been used (madvise DONTNEED: the page cache keeps them, a later read
    // maps them again), so that streaming a large file keeps the resident set small. No-op for
    // in-memory data or a range outside the mapping.
    void release(std::span<const std::byte> bytes) const noexcept;

private:
    MappedFile() = default;

    std::filesystem::path path_;
    std::string name_;
    const std::byte* data_ = nullptr;
    std::size_t size_ = 0;
    bool mapped_ = false;
    std::unique_ptr<std::byte[]> heap_;
    int fd_ = -1;  // kept open while mapped, for mapped_source() (up to half the descriptor limit)
};

// Where `bytes` come from when they lie wholly inside the mapping of a live MappedFile: its open
// descriptor and the offset in the file, so that a writer can copy them file to file inside the
// kernel (copy_file_range) instead of through the mapping. nullopt for anything else. The
// descriptor is valid as long as that MappedFile is.
struct FileRange {
    int fd = -1;
    std::uint64_t offset = 0;
};
std::optional<FileRange> mapped_source(std::span<const std::byte> bytes) noexcept;

// Copies `bytes` to `dst` (bytes.size() bytes). Bytes that lie in the mapping of a live
// MappedFile are read from its descriptor (pread): for data read once, a copy out of the page
// cache costs less than mapping the pages into the process (a fault per 64 KiB, then the
// unmapping). Anything else, or a read that fails, is copied through memory.
void read_bytes(std::span<const std::byte> bytes, std::byte* dst) noexcept;

}  // namespace lorakit
