#include "lorakit/atomic_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <mutex>
#include <random>
#include <set>

#include "lorakit/error.h"
#include "lorakit/mapped_file.h"

namespace lorakit {

namespace fs = std::filesystem;

namespace {

constexpr std::size_t buffer_capacity = 4u << 20;
constexpr std::size_t direct_write_size = 64u << 10;  // written without the buffer from this size up

[[noreturn]] void fail_io(std::string_view what, const fs::path& path, int err) {
    fail(ErrorCode::io, "cannot {} {}: {}", what, quote(path.string()), std::strerror(err));
}

fs::path directory_of(const fs::path& target) {
    fs::path dir = target.parent_path();
    return dir.empty() ? fs::path(".") : dir;
}

// Named temporaries (only used where O_TMPFILE is unavailable) are removed on SIGINT/SIGTERM.
// The handler may only use async-signal-safe calls, hence the fixed table.
constexpr int max_temps = 16;
char temp_table[max_temps][PATH_MAX];
std::atomic<bool> temp_used[max_temps];

// Removes a temporary file, or a temporary output directory and what it holds (a few levels
// deep: diffusers folders have one). opendir is not formally async-signal-safe; the process is
// about to die and nothing else runs.
void remove_temp(const char* path, int depth = 0) {
    if (::unlink(path) == 0 || depth > 4) return;
    if (DIR* dir = ::opendir(path)) {
        char child[PATH_MAX];
        while (const dirent* entry = ::readdir(dir)) {
            if (entry->d_name[0] == '.' && (entry->d_name[1] == '\0' || (entry->d_name[1] == '.' && entry->d_name[2] == '\0')))
                continue;
            if (::unlinkat(::dirfd(dir), entry->d_name, 0) == 0) continue;
            const std::size_t a = std::strlen(path), b = std::strlen(entry->d_name);
            if (a + b + 2 > sizeof child) continue;
            std::memcpy(child, path, a);
            child[a] = '/';
            std::memcpy(child + a + 1, entry->d_name, b + 1);
            remove_temp(child, depth + 1);
        }
        ::closedir(dir);
        ::rmdir(path);
    }
}

extern "C" void remove_temps_and_reraise(int signal_number) {
    for (int i = 0; i < max_temps; ++i)
        if (temp_used[i].load()) remove_temp(temp_table[i]);
    ::signal(signal_number, SIG_DFL);
    ::raise(signal_number);
}

int register_temp(const std::string& path) {
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
        struct sigaction action {};
        action.sa_handler = remove_temps_and_reraise;
        sigemptyset(&action.sa_mask);
        struct sigaction old {};
        // Keep a handler the program installed itself (or an ignored signal).
        if (::sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) ::sigaction(sig, &action, nullptr);
    }
    if (path.size() >= PATH_MAX) return -1;
    for (int i = 0; i < max_temps; ++i) {
        if (temp_used[i].load()) continue;
        std::memcpy(temp_table[i], path.c_str(), path.size() + 1);
        temp_used[i].store(true);
        return i;
    }
    return -1;
}

void unregister_temp(const std::string& path) {
    for (int i = 0; i < max_temps; ++i)
        if (temp_used[i].load() && path == temp_table[i]) temp_used[i].store(false);
}

std::string random_suffix() {
    static std::mutex mutex;
    static std::mt19937_64 engine{std::random_device{}()};
    std::lock_guard lock(mutex);
    static constexpr char alphabet[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    std::string out(8, 'x');
    for (auto& c : out) c = alphabet[engine() % (sizeof(alphabet) - 1)];
    return out;
}

// ".<name>.lorakit-<pid>-<random>" next to the target: the pid tells a later run whether the
// process that made it is gone.
std::string hidden_temp_name(const fs::path& dir, const fs::path& target) {
    return (dir / fmt::format(".{}.lorakit-{}-{}", target.filename().string(), ::getpid(), random_suffix())).string();
}

// Removes the hidden temporaries of `target` that a killed run left behind (SIGKILL cannot be
// caught: a directory output killed while its files are being linked in, or a named temporary
// where O_TMPFILE is missing). Only those whose process no longer exists; errors are ignored.
void remove_stale_temporaries(const fs::path& dir, const fs::path& target) {
    const std::string prefix = fmt::format(".{}.lorakit-", target.filename().string());
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
        const std::string name = it->path().filename().string();
        if (!name.starts_with(prefix)) continue;
        const std::string rest = name.substr(prefix.size());
        const auto dash = rest.find('-');
        if (dash == std::string::npos || dash == 0 || rest.find_first_not_of("0123456789") != dash) continue;
        const long pid = std::strtol(rest.substr(0, dash).c_str(), nullptr, 10);
        if (pid <= 0 || pid == ::getpid() || ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
        std::error_code ignored;
        fs::remove_all(it->path(), ignored);
    }
}

std::atomic<bool> g_sync_outputs{true};

void fsync_directory(const fs::path& dir) {
    if (!g_sync_outputs.load(std::memory_order_relaxed)) return;
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        ::fsync(fd);
        ::close(fd);
    }
}

}  // namespace

void set_sync_outputs(bool sync) noexcept { g_sync_outputs.store(sync, std::memory_order_relaxed); }
bool sync_outputs() noexcept { return g_sync_outputs.load(std::memory_order_relaxed); }

void check_output_path(const fs::path& target, bool overwrite) {
    if (target == "-") return;
    std::error_code ec;
    const auto status = fs::symlink_status(target, ec);
    if (fs::exists(status)) {
        if (fs::is_directory(status))
            fail(ErrorCode::usage, "output {} is an existing directory", quote(target.string()));
        if (!overwrite) fail(ErrorCode::usage, "output {} exists (use --force to replace it)", quote(target.string()));
    }
    const fs::path dir = directory_of(target);
    if (!fs::is_directory(dir, ec))
        fail(ErrorCode::io, "cannot write {}: directory {} does not exist", quote(target.string()),
             quote(dir.string()));
}

namespace {

bool proc_fd_usable() noexcept {
    static const bool usable = ::access("/proc/self/fd", X_OK) == 0;
    return usable;
}

// The umask, read from /proc/self/status: umask() can only be read by setting it, which
// would change file modes under any other thread creating a file at that moment. Without
// /proc (then O_TMPFILE is not used either) nothing is returned.
std::optional<mode_t> process_umask() noexcept {
    std::FILE* status = std::fopen("/proc/self/status", "re");
    if (!status) return std::nullopt;
    char line[256];
    std::optional<mode_t> mask;
    while (std::fgets(line, sizeof line, status)) {
        unsigned value = 0;
        if (std::sscanf(line, "Umask: %o", &value) == 1) {
            mask = static_cast<mode_t>(value);
            break;
        }
    }
    std::fclose(status);
    return mask;
}

}  // namespace

AtomicFile::AtomicFile(fs::path target, bool overwrite) : target_(std::move(target)), overwrite_(overwrite) {
    if (target_ == "-") {
        to_stdout_ = true;
        fd_ = STDOUT_FILENO;
        buffer_ = std::make_unique_for_overwrite<std::byte[]>(capacity_ = 1 << 16);
        return;
    }
    check_output_path(target_, overwrite_);
    remove_stale_temporaries(directory_of(target_), target_);
    open_temporary(directory_of(target_));
}

AtomicFile::AtomicFile(fs::path description, const fs::path& scratch, Staged)
    : target_(std::move(description)), overwrite_(false), staged_(true) {
    open_temporary(scratch);
}

void AtomicFile::open_temporary(const fs::path& dir) {
    // LORAKIT_ATOMIC_NAMED_TEMP=1 forces the fallback path (for tests of it).
    const char* force_named = std::getenv("LORAKIT_ATOMIC_NAMED_TEMP");
    // An anonymous file is published by linking /proc/self/fd/N, so it needs /proc.
    if ((!force_named || std::string_view(force_named) != "1") && proc_fd_usable())
        fd_ = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
    if (fd_ >= 0) {
        anonymous_ = true;
        // Some kernels skip the umask for O_TMPFILE (with default ACLs); apply it explicitly.
        if (const auto mask = process_umask()) ::fchmod(fd_, 0666 & ~*mask);
    } else {
        for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
            temp_path_ = hidden_temp_name(dir, target_);
            fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
            if (fd_ < 0 && errno != EEXIST) fail_io("create a temporary file in", dir, errno);
        }
        if (fd_ < 0) fail_io("create a temporary file in", dir, EEXIST);
        register_temp(temp_path_);
    }
    // Not zero-filled: a page of it is touched only when small writes reach it.
    buffer_ = std::make_unique_for_overwrite<std::byte[]>(capacity_ = buffer_capacity);
}

AtomicFile::~AtomicFile() {
    if (!committed_) discard();
}

void AtomicFile::discard() noexcept {
    if (to_stdout_) return;
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
    if (!temp_path_.empty()) {
        ::unlink(temp_path_.c_str());
        unregister_temp(temp_path_);
        temp_path_.clear();
    }
}

void AtomicFile::raw_write(const std::byte* data, std::size_t size) {
    while (size > 0) {
        const ssize_t n = ::write(fd_, data, size);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail_io("write", to_stdout_ ? fs::path("<stdout>") : target_, errno);
        }
        data += n;
        size -= static_cast<std::size_t>(n);
        flushed_ += static_cast<std::uint64_t>(n);
    }
    start_writeback();
}

// Large outputs: start the disk writeback of every 64 MiB as it is written, so that the
// fsync in commit() waits for the tail only instead of the whole file.
void AtomicFile::start_writeback() noexcept {
    constexpr std::uint64_t chunk = 64u << 20;
    if (to_stdout_ || flushed_ - writeback_from_ < chunk || !sync_outputs()) return;
    ::sync_file_range(fd_, static_cast<off_t>(writeback_from_), static_cast<off_t>(flushed_ - writeback_from_),
                      SYNC_FILE_RANGE_WRITE);
    writeback_from_ = flushed_;
}

// Bytes that lie in a mapped input file (a tensor copied unchanged) are copied file to file in
// the kernel: no page faults on the mapping, no pass through user space, as `cp` does. Returns
// how many were copied; the rest (all of them where the file systems cannot) goes through write().
std::size_t AtomicFile::copy_mapped(std::span<const std::byte> bytes) {
    if (to_stdout_ || !copy_range_ok_) return 0;
    const std::optional<FileRange> from = mapped_source(bytes);
    if (!from) return 0;
    auto in = static_cast<loff_t>(from->offset);
    std::size_t done = 0;
    while (done < bytes.size()) {
        const ssize_t n = ::copy_file_range(from->fd, &in, fd_, nullptr, bytes.size() - done, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP && errno != EBADF)
            fail_io("write", target_, errno);
        if (n <= 0) {
            copy_range_ok_ = n == 0;  // 0: the input ends early (changed under us); write() shows it
            break;
        }
        done += static_cast<std::size_t>(n);
        flushed_ += static_cast<std::uint64_t>(n);
    }
    start_writeback();
    return done;
}

void AtomicFile::flush_buffer() {
    const std::size_t n = buffered_;
    buffered_ = 0;
    raw_write(buffer_.get(), n);
}

void AtomicFile::write(std::span<const std::byte> bytes) {
    if (committed_ || fd_ < 0) fail(ErrorCode::internal, "write after commit to {}", quote(target_.string()));
    written_ += bytes.size();
    while (!bytes.empty()) {
        if (bytes.size() >= direct_write_size) {
            // Large blocks (a tensor's data, usually straight from a mapped input) go out in
            // their own write: copying them through the buffer gains nothing.
            if (buffered_ > 0) flush_buffer();
            const std::size_t copied = copy_mapped(bytes);
            raw_write(bytes.data() + copied, bytes.size() - copied);
            return;
        }
        const std::size_t n = std::min(bytes.size(), capacity_ - buffered_);
        std::memcpy(buffer_.get() + buffered_, bytes.data(), n);
        buffered_ += n;
        bytes = bytes.subspan(n);
        if (buffered_ == capacity_) flush_buffer();
    }
}

void AtomicFile::patch(std::uint64_t offset, std::span<const std::byte> bytes) {
    if (committed_ || fd_ < 0 || to_stdout_ || offset > written_ || bytes.size() > written_ - offset)
        fail(ErrorCode::internal, "bad patch of {} bytes at {} in {}", bytes.size(), offset, quote(target_.string()));
    flush_buffer();
    while (!bytes.empty()) {
        const ssize_t n = ::pwrite(fd_, bytes.data(), bytes.size(), static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR) continue;
            fail_io("write", target_, errno);
        }
        bytes = bytes.subspan(static_cast<std::size_t>(n));
        offset += static_cast<std::uint64_t>(n);
    }
}

void AtomicFile::commit() {
    if (committed_) return;
    flush_buffer();
    if (to_stdout_) {
        committed_ = true;
        return;
    }
    if (!synced_ && sync_outputs() && ::fsync(fd_) != 0) fail_io("sync", target_, errno);
    synced_ = true;
    if (staged_) return;  // the directory places it
    const fs::path dir = directory_of(target_);
    if (anonymous_) {
        const std::string proc = fmt::format("/proc/self/fd/{}", fd_);
        if (!overwrite_) {
            if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, target_.c_str(), AT_SYMLINK_FOLLOW) != 0) {
                if (errno == EEXIST)
                    fail(ErrorCode::usage, "output {} exists (use --force to replace it)", quote(target_.string()));
                fail_io("create", target_, errno);
            }
        } else {
            // Give the data a hidden name first, then rename it over the target atomically.
            std::string hidden;
            for (int attempt = 0; attempt < 100; ++attempt) {
                hidden = hidden_temp_name(dir, target_);
                if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, hidden.c_str(), AT_SYMLINK_FOLLOW) == 0) break;
                if (errno != EEXIST) fail_io("create", target_, errno);
                hidden.clear();
            }
            if (hidden.empty()) fail_io("create", target_, EEXIST);
            if (::rename(hidden.c_str(), target_.c_str()) != 0) {
                const int err = errno;
                ::unlink(hidden.c_str());
                fail_io("replace", target_, err);
            }
        }
    } else {
        if (!overwrite_) {
            // link() refuses an existing target: the no-clobber check and the move are one step.
            if (::link(temp_path_.c_str(), target_.c_str()) != 0) {
                if (errno == EEXIST)
                    fail(ErrorCode::usage, "output {} exists (use --force to replace it)", quote(target_.string()));
                fail_io("create", target_, errno);
            }
            ::unlink(temp_path_.c_str());
        } else if (::rename(temp_path_.c_str(), target_.c_str()) != 0) {
            fail_io("replace", target_, errno);
        }
        unregister_temp(temp_path_);
        temp_path_.clear();
    }
    ::close(fd_);
    fd_ = -1;
    fsync_directory(dir);
    committed_ = true;
}

void AtomicFile::place(const fs::path& path) {
    if (!staged_ || !synced_ || committed_) fail(ErrorCode::internal, "{} placed before commit", quote(target_.string()));
    if (anonymous_) {
        const std::string proc = fmt::format("/proc/self/fd/{}", fd_);
        if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, path.c_str(), AT_SYMLINK_FOLLOW) != 0) fail_io("create", path, errno);
    } else {
        if (::rename(temp_path_.c_str(), path.c_str()) != 0) fail_io("create", path, errno);
        unregister_temp(temp_path_);
        temp_path_.clear();
    }
    ::close(fd_);
    fd_ = -1;
    committed_ = true;
}

AtomicDirectory::AtomicDirectory(fs::path target, bool overwrite) : target_(std::move(target)), overwrite_(overwrite) {
    if (target_ == "-") fail(ErrorCode::usage, "this output is a directory; '-' (standard output) takes single files only");
    std::error_code ec;
    const auto status = fs::symlink_status(target_, ec);
    if (fs::exists(status)) {
        if (!fs::is_directory(status))
            fail(ErrorCode::usage, "output {} exists and is not a directory", quote(target_.string()));
        if (!overwrite_)
            fail(ErrorCode::usage, "output directory {} exists (use --force to replace it)", quote(target_.string()));
    }
    const fs::path dir = directory_of(target_);
    if (!fs::is_directory(dir, ec))
        fail(ErrorCode::io, "cannot write {}: directory {} does not exist", quote(target_.string()), quote(dir.string()));
    remove_stale_temporaries(dir, target_);
}

AtomicDirectory::~AtomicDirectory() {
    files_.clear();  // unnamed data goes with its descriptors
    if (committed_ || temp_.empty()) return;
    std::error_code ec;
    fs::remove_all(temp_, ec);
    unregister_temp(temp_.string());
}

AtomicFile& AtomicDirectory::add(const std::string& relative) {
    const fs::path rel = fs::path(relative).lexically_normal();
    if (committed_ || rel.empty() || rel.is_absolute() || *rel.begin() == "..")
        fail(ErrorCode::internal, "bad file {} for directory {}", quote(relative), quote(target_.string()));
    for (const auto& [name, file] : files_)
        if (name == rel.generic_string()) fail(ErrorCode::internal, "file {} added twice", quote(relative));
    files_.emplace_back(rel.generic_string(),
                        std::unique_ptr<AtomicFile>(new AtomicFile(target_ / rel, directory_of(target_), AtomicFile::Staged{})));
    return *files_.back().second;
}

void AtomicDirectory::commit() {
    const fs::path dir = directory_of(target_);
    for (const auto& [name, file] : files_)
        if (!file->synced_) fail(ErrorCode::internal, "file {} of {} was not committed", quote(name), quote(target_.string()));
    // Names appear only now: a fresh hidden directory, every file linked in, then the rename.
    for (int attempt = 0; attempt < 100 && temp_.empty(); ++attempt) {
        const fs::path candidate = hidden_temp_name(dir, target_);
        if (::mkdir(candidate.c_str(), 0777) == 0) {
            temp_ = candidate;
            register_temp(temp_.string());
        } else if (errno != EEXIST) {
            fail_io("create a temporary directory in", dir, errno);
        }
    }
    if (temp_.empty()) fail_io("create a temporary directory in", dir, EEXIST);
    std::set<fs::path> synced_dirs{temp_};
    for (const auto& [name, file] : files_) {
        const fs::path path = temp_ / name;
        std::error_code mk;
        fs::create_directories(path.parent_path(), mk);
        if (mk) fail_io("create", path.parent_path(), mk.value());
        file->place(path);
        synced_dirs.insert(path.parent_path());
    }
    for (const auto& d : synced_dirs) fsync_directory(d);
    std::error_code ec;
    if (fs::exists(fs::symlink_status(target_, ec))) {
        if (!overwrite_)
            fail(ErrorCode::usage, "output directory {} exists (use --force to replace it)", quote(target_.string()));
        const fs::path old = hidden_temp_name(dir, target_);
        if (::rename(target_.c_str(), old.c_str()) != 0) fail_io("replace", target_, errno);
        if (::rename(temp_.c_str(), target_.c_str()) != 0) {
            const int err = errno;
            ::rename(old.c_str(), target_.c_str());
            fail_io("replace", target_, err);
        }
        fs::remove_all(old, ec);
    } else if (::rename(temp_.c_str(), target_.c_str()) != 0) {
        fail_io("create", target_, errno);
    }
    unregister_temp(temp_.string());
    fsync_directory(dir);
    committed_ = true;
}

void write_file_atomically(const fs::path& target, std::span<const std::byte> bytes, bool overwrite) {
    AtomicFile file(target, overwrite);
    file.write(bytes);
    file.commit();
}

}  // namespace lorakit
