#include "lorakit/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "lorakit/error.h"

namespace lorakit {
namespace {

[[noreturn]] void fail_errno(const std::string& what, int err) {
    fail(ErrorCode::io, "{}: {}", what, std::strerror(err));
}

std::vector<std::byte> read_all(int fd, const std::string& name) {
    std::vector<std::byte> data;
    std::size_t used = 0;
    for (;;) {
        if (data.size() - used < 65536) data.resize(std::max<std::size_t>(data.size() * 2, 1 << 20));
        const ssize_t n = ::read(fd, data.data() + used, data.size() - used);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail_errno("cannot read " + quote(name), errno);
        }
        if (n == 0) break;
        used += static_cast<std::size_t>(n);
    }
    data.resize(used);
    return data;
}

// The live mappings, by start address: end and descriptor.
struct Mappings {
    std::mutex mutex;
    std::map<std::uintptr_t, std::pair<std::uintptr_t, int>> by_start;
    std::size_t max_kept = [] {
        rlimit limit{};
        if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return std::size_t{512};
        return static_cast<std::size_t>(limit.rlim_cur / 2);
    }();
};

Mappings& mappings() {
    static Mappings* m = new Mappings();  // never destroyed: MappedFiles may outlive statics
    return *m;
}

}  // namespace

std::optional<FileRange> mapped_source(std::span<const std::byte> bytes) noexcept {
    if (bytes.empty()) return std::nullopt;
    const auto begin = reinterpret_cast<std::uintptr_t>(bytes.data()), end = begin + bytes.size();
    Mappings& m = mappings();
    std::lock_guard lock(m.mutex);
    auto it = m.by_start.upper_bound(begin);
    if (it == m.by_start.begin()) return std::nullopt;
    --it;
    if (end > it->second.first) return std::nullopt;
    return FileRange{it->second.second, static_cast<std::uint64_t>(begin - it->first)};
}

void read_bytes(std::span<const std::byte> bytes, std::byte* dst) noexcept {
    std::size_t done = 0;
    if (const std::optional<FileRange> from = mapped_source(bytes)) {
        while (done < bytes.size()) {
            const ssize_t n = ::pread(from->fd, dst + done, bytes.size() - done, static_cast<off_t>(from->offset + done));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;  // the rest through the mapping, which reports a changed file as reading it would
            done += static_cast<std::size_t>(n);
        }
    }
    if (done < bytes.size()) std::memcpy(dst + done, bytes.data() + done, bytes.size() - done);
}

std::shared_ptr<const MappedFile> MappedFile::open(const std::filesystem::path& path) {
    auto file = std::shared_ptr<MappedFile>(new MappedFile());
    file->path_ = path;
    if (path == "-") {
        file->name_ = "<stdin>";
        auto data = read_all(STDIN_FILENO, file->name_);
        file->size_ = data.size();
        file->heap_ = std::make_unique<std::byte[]>(data.size() ? data.size() : 1);
        if (!data.empty()) std::memcpy(file->heap_.get(), data.data(), data.size());
        file->data_ = file->heap_.get();
        return file;
    }
    file->name_ = path.string();
    // O_NONBLOCK keeps a FIFO from blocking the open; such files are refused below anyway.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fail_errno("cannot open " + quote(file->name_), errno);
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        const int err = errno;
        ::close(fd);
        fail_errno("cannot stat " + quote(file->name_), err);
    }
    if (S_ISDIR(st.st_mode)) {
        ::close(fd);
        fail(ErrorCode::bad_input, "{} is a directory, expected a file", quote(file->name_));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(ErrorCode::bad_input, "{} is not a regular file", quote(file->name_));
    }
    file->size_ = static_cast<std::size_t>(st.st_size);
    if (file->size_ > 0) {
        void* map = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            const int err = errno;
            ::close(fd);
            fail_errno("cannot map " + quote(file->name_), err);
        }
        file->data_ = static_cast<const std::byte*>(map);
        file->mapped_ = true;
        // The descriptor stays open for mapped_source(), but at most for half the process's
        // descriptor limit: a stack of thousands of inputs must still open them all.
        Mappings& m = mappings();
        std::lock_guard lock(m.mutex);
        if (m.by_start.size() < m.max_kept) {
            file->fd_ = fd;
            const auto start = reinterpret_cast<std::uintptr_t>(map);
            m.by_start[start] = {start + file->size_, fd};
            return file;
        }
    }
    ::close(fd);
    return file;
}

std::shared_ptr<const MappedFile> MappedFile::from_bytes(std::string display_name, std::span<const std::byte> bytes) {
    auto file = std::shared_ptr<MappedFile>(new MappedFile());
    file->name_ = std::move(display_name);
    file->path_ = file->name_;
    file->size_ = bytes.size();
    file->heap_ = std::make_unique<std::byte[]>(bytes.size() ? bytes.size() : 1);
    if (!bytes.empty()) std::memcpy(file->heap_.get(), bytes.data(), bytes.size());
    file->data_ = file->heap_.get();
    return file;
}

MappedFile::~MappedFile() {
    if (!mapped_) return;
    if (fd_ >= 0) {
        Mappings& m = mappings();
        std::lock_guard lock(m.mutex);
        m.by_start.erase(reinterpret_cast<std::uintptr_t>(data_));
    }
    ::munmap(const_cast<std::byte*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
}

void MappedFile::prefetch(std::size_t offset, std::size_t length) const noexcept {
    if (!mapped_ || offset >= size_) return;
    length = std::min(length, size_ - offset);
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t start = offset / page * page;
    const std::size_t end = offset + length;
    // In chunks, each mapped (which reads it from the disk and waits) and unmapped again (the page
    // cache keeps it): the resident set does not grow with what is read ahead. Only a read ahead:
    // an error (EIO, a file truncated meanwhile) shows when the bytes are used.
    // A chunk wholly in the page cache already (mincore) is skipped: mapping it here would only
    // cost the workers' time (a warm lora-stack --base: +0.3 s of 2.8).
    constexpr std::size_t chunk = std::size_t{8} << 20;
    std::vector<unsigned char> resident(chunk / page + 1);
    for (std::size_t at = start; at < end; at += chunk) {
        const std::size_t n = std::min(chunk, end - at);
        auto* where = const_cast<std::byte*>(data_) + at;
        if (::mincore(where, n, resident.data()) == 0 &&
            std::all_of(resident.begin(), resident.begin() + static_cast<std::ptrdiff_t>((n + page - 1) / page),
                        [](unsigned char r) { return (r & 1) != 0; }))
            continue;
        if (::madvise(where, n, MADV_POPULATE_READ) != 0) {
            if (errno == EINVAL) ::madvise(where, end - at, MADV_WILLNEED);  // before Linux 5.14: a hint
            return;
        }
        release({where, n});
    }
}

void MappedFile::release(std::span<const std::byte> bytes) const noexcept {
    if (!mapped_ || bytes.empty() || bytes.data() < data_ || bytes.data() + bytes.size() > data_ + size_) return;
    const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto begin = reinterpret_cast<std::uintptr_t>(bytes.data());
    const auto end = begin + bytes.size();
    const std::uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;  // whole pages only
    if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

}  // namespace lorakit
