// PyTorch checkpoints saved by torch.save (the zip format, PyTorch >= 1.6): a ZIP archive with
// <archive>/data.pkl (a pickle of the state dict) and <archive>/data/<key> (raw storages).
//
// The pickle is read by a restricted unpickler that executes nothing: it knows the opcodes a
// state dict needs and exactly these globals: collections.OrderedDict,
// torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter and the torch.*Storage
// types. Any other global is refused by name. Storages are persistent ids
// ('storage', <type>, key, location, numel) resolved to the archive's stored (uncompressed)
// entries, which stay memory-mapped: contiguous tensors are views into the file.
#include "pytorch_pickle.h"

#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <variant>

#include <fmt/format.h>

#include "lorakit/error.h"
#include "parsed_tensor_file.h"

namespace lorakit::formats {

namespace {

// ---- ZIP ------------------------------------------------------------------------------------

struct ZipEntry {
    std::string name;
    std::uint16_t method = 0;
    std::uint64_t compressed = 0, size = 0, data_offset = 0;
};

std::uint64_t le(std::span<const std::byte> b, std::uint64_t at, int n) {
    std::uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<std::uint8_t>(b[static_cast<std::size_t>(at + i)]);
    return v;
}

void need(std::span<const std::byte> b, std::uint64_t at, std::uint64_t n, std::string_view what) {
    if (at > b.size() || n > b.size() - at) fail(ErrorCode::bad_input, "zip archive truncated in {}", what);
}

std::vector<ZipEntry> read_zip(std::span<const std::byte> b) {
    // End of central directory: 22 bytes plus a comment of up to 65535 bytes at the very end.
    if (b.size() < 22) fail(ErrorCode::bad_input, "too short for a zip archive");
    std::uint64_t eocd = b.size();
    const std::uint64_t lowest = b.size() > 22 + 65535 ? b.size() - 22 - 65535 : 0;
    for (std::uint64_t p = b.size() - 22 + 1; p-- > lowest;)
        if (le(b, p, 4) == 0x06054b50 && p + 22 + le(b, p + 20, 2) == b.size()) {
            eocd = p;
            break;
        }
    if (eocd == b.size()) fail(ErrorCode::bad_input, "zip archive has no end-of-central-directory record");
    std::uint64_t count = le(b, eocd + 10, 2), cd_size = le(b, eocd + 12, 4), cd_offset = le(b, eocd + 16, 4);
    if (count == 0xffff || cd_size == 0xffffffff || cd_offset == 0xffffffff) {
        // ZIP64: a locator right before the record points at the zip64 end record.
        if (eocd < 20 || le(b, eocd - 20, 4) != 0x07064b50) fail(ErrorCode::bad_input, "zip64 locator missing");
        const std::uint64_t z = le(b, eocd - 20 + 8, 8);
        need(b, z, 56, "the zip64 end record");
        if (le(b, z, 4) != 0x06064b50) fail(ErrorCode::bad_input, "bad zip64 end record");
        count = le(b, z + 32, 8);
        cd_size = le(b, z + 40, 8);
        cd_offset = le(b, z + 48, 8);
    }
    need(b, cd_offset, cd_size, "the central directory");
    if (count > cd_size / 46) fail(ErrorCode::bad_input, "zip central directory claims {} entries in {} bytes", count, cd_size);
    std::vector<ZipEntry> entries;
    entries.reserve(static_cast<std::size_t>(count));
    std::uint64_t p = cd_offset;
    for (std::uint64_t i = 0; i < count; ++i) {
        need(b, p, 46, "a central directory entry");
        if (le(b, p, 4) != 0x02014b50) fail(ErrorCode::bad_input, "bad zip central directory entry {}", i);
        ZipEntry e;
        const std::uint64_t flags = le(b, p + 8, 2);
        e.method = static_cast<std::uint16_t>(le(b, p + 10, 2));
        e.compressed = le(b, p + 20, 4);
        e.size = le(b, p + 24, 4);
        const std::uint64_t name_len = le(b, p + 28, 2), extra_len = le(b, p + 30, 2), comment_len = le(b, p + 32, 2);
        std::uint64_t local = le(b, p + 42, 4);
        need(b, p + 46, name_len + extra_len + comment_len, "a central directory entry");
        e.name.assign(reinterpret_cast<const char*>(b.data() + p + 46), static_cast<std::size_t>(name_len));
        if (flags & 1) fail(ErrorCode::unsupported, "zip entry {} is encrypted", quote(e.name));
        // ZIP64 extra field: the 64-bit values of the fields that hold 0xffffffff, in order.
        for (std::uint64_t x = p + 46 + name_len, end = x + extra_len; x + 4 <= end;) {
            const std::uint64_t id = le(b, x, 2), len = le(b, x + 2, 2);
            if (x + 4 + len > end) fail(ErrorCode::bad_input, "bad zip extra field in {}", quote(e.name));
            if (id == 1) {
                std::uint64_t q = x + 4;
                auto take = [&](std::uint64_t& field) {
                    if (field != 0xffffffff) return;
                    if (q + 8 > x + 4 + len) fail(ErrorCode::bad_input, "short zip64 field in {}", quote(e.name));
                    field = le(b, q, 8);
                    q += 8;
                };
                take(e.size);
                take(e.compressed);
                take(local);
            }
            x += 4 + len;
        }
        need(b, local, 30, "a local file header");
        if (le(b, local, 4) != 0x04034b50) fail(ErrorCode::bad_input, "bad local header for zip entry {}", quote(e.name));
        e.data_offset = local + 30 + le(b, local + 26, 2) + le(b, local + 28, 2);
        need(b, e.data_offset, e.compressed, "entry data");
        entries.push_back(std::move(e));
        p += 46 + name_len + extra_len + comment_len;
    }
    return entries;
}

// ---- the restricted unpickler ---------------------------------------------------------------

struct Value;
// Values live in the unpickler's arena: a pickle may build cycles (a dict holding itself), which
// reference counting would leak.
using Ptr = Value*;

struct Global {
    std::string module, name;
};
struct Storage {
    DType dtype;
    std::string key;
    std::int64_t numel;
};
struct TensorRef {
    Ptr storage;
    std::int64_t offset = 0;
    std::vector<std::int64_t> size, stride;
};
struct Mark {};
struct None {};
using Items = std::vector<Ptr>;
struct Tuple {
    Items items;
};
struct List {
    Items items;
};
struct Dict {
    std::vector<std::pair<Ptr, Ptr>> items;
};

struct Value {
    std::variant<None, bool, std::int64_t, double, std::string, Tuple, List, Dict, Global, Storage, TensorRef, Mark> v;
};


std::optional<DType> storage_dtype(std::string_view name) {
    static const std::pair<std::string_view, DType> table[] = {
        {"FloatStorage", DType::F32},  {"HalfStorage", DType::F16},  {"BFloat16Storage", DType::BF16},
        {"DoubleStorage", DType::F64}, {"LongStorage", DType::I64},  {"IntStorage", DType::I32},
        {"ShortStorage", DType::I16},  {"CharStorage", DType::I8},   {"ByteStorage", DType::U8},
        {"BoolStorage", DType::BOOL},
    };
    for (const auto& [n, t] : table)
        if (n == name) return t;
    return std::nullopt;
}

bool allowed_global(const Global& g) {
    if (g.module == "collections" && g.name == "OrderedDict") return true;
    if (g.module == "torch._utils" && (g.name == "_rebuild_tensor_v2" || g.name == "_rebuild_parameter")) return true;
    if (g.module == "torch" && storage_dtype(g.name)) return true;
    return false;
}

std::string describe(const Ptr& p) {
    static constexpr std::string_view names[] = {"None", "bool", "int", "float", "str", "tuple", "list",
                                                 "dict", "global", "storage", "tensor", "mark"};
    return std::string(names[p->v.index()]);
}

std::int64_t as_int(const Ptr& p, std::string_view what) {
    if (const auto* i = std::get_if<std::int64_t>(&p->v)) return *i;
    if (const auto* b = std::get_if<bool>(&p->v)) return *b;
    fail(ErrorCode::bad_input, "pickle: {} is a {}, not an int", what, describe(p));
}

const Items& as_tuple(const Ptr& p, std::string_view what) {
    if (const auto* t = std::get_if<Tuple>(&p->v)) return t->items;
    fail(ErrorCode::bad_input, "pickle: {} is a {}, not a tuple", what, describe(p));
}

class Unpickler {
public:
    explicit Unpickler(std::span<const std::byte> data) : d_(data) {}
    Unpickler(const Unpickler&) = delete;
    Unpickler& operator=(const Unpickler&) = delete;

    Ptr run() {
        while (true) {
            const auto op = static_cast<std::uint8_t>(byte());
            switch (op) {
            case 0x80: byte(); break;  // PROTO
            case 0x95: take(8); break;  // FRAME: the frame is just more of the stream
            case '.': {                 // STOP
                const Ptr result = pop();
                if (!stack_.empty()) fail(ErrorCode::bad_input, "pickle: {} values left on the stack at STOP", stack_.size());
                return result;
            }
            case '(': marks_.push_back(stack_.size()); break;
            case ')': push(make(Tuple{})); break;
            case ']': push(make(List{})); break;
            case '}': push(make(Dict{})); break;
            case 'N': push(make(None{})); break;
            case 0x88: push(make(true)); break;
            case 0x89: push(make(false)); break;
            case 'J': push(make(static_cast<std::int64_t>(static_cast<std::int32_t>(uint(4))))); break;
            case 'K': push(make(static_cast<std::int64_t>(uint(1)))); break;
            case 'M': push(make(static_cast<std::int64_t>(uint(2)))); break;
            case 0x8a: {  // LONG1
                const auto n = uint(1);
                if (n > 8) fail(ErrorCode::unsupported, "pickle: an integer of {} bytes", n);
                std::uint64_t v = 0;
                const auto bytes = take(n);
                for (std::size_t i = n; i-- > 0;) v = (v << 8) | static_cast<std::uint8_t>(bytes[i]);
                if (n > 0 && n < 8 && (static_cast<std::uint8_t>(bytes[n - 1]) & 0x80)) v |= ~0ull << (8 * n);
                push(make(static_cast<std::int64_t>(v)));
                break;
            }
            case 'G': {  // BINFLOAT, big-endian
                std::uint64_t v = 0;
                for (auto b : take(8)) v = (v << 8) | static_cast<std::uint8_t>(b);
                double x;
                std::memcpy(&x, &v, 8);
                push(make(x));
                break;
            }
            case 'X': push(make(text(uint(4)))); break;         // BINUNICODE
            case 0x8c: push(make(text(uint(1)))); break;        // SHORT_BINUNICODE
            case 0x8d: push(make(text(uint(8)))); break;        // BINUNICODE8
            case 'T': push(make(text(uint(4)))); break;         // BINSTRING
            case 'U': push(make(text(uint(1)))); break;         // SHORT_BINSTRING
            case 'B': push(make(text(uint(4)))); break;         // BINBYTES (kept as a string)
            case 'C': push(make(text(uint(1)))); break;         // SHORT_BINBYTES
            case 'q': memo_[uint(1)] = top(); break;            // BINPUT
            case 'r': memo_[uint(4)] = top(); break;            // LONG_BINPUT
            case 0x94: memo_[memo_.size()] = top(); break;      // MEMOIZE
            case 'h': push(get(uint(1))); break;                // BINGET
            case 'j': push(get(uint(4))); break;                // LONG_BINGET
            case 'c': {                                         // GLOBAL
                Global g{line(), line()};
                push(global(std::move(g)));
                break;
            }
            case 0x93: {  // STACK_GLOBAL
                const Ptr name = pop(), module = pop();
                const auto* n = std::get_if<std::string>(&name->v);
                const auto* m = std::get_if<std::string>(&module->v);
                if (!n || !m) fail(ErrorCode::bad_input, "pickle: STACK_GLOBAL needs two strings");
                push(global({*m, *n}));
                break;
            }
            case 't': push(make(Tuple{pop_mark()})); break;
            case 0x85: push(make(Tuple{pop_n(1)})); break;
            case 0x86: push(make(Tuple{pop_n(2)})); break;
            case 0x87: push(make(Tuple{pop_n(3)})); break;
            case 'l': push(make(List{pop_mark()})); break;
            case 'a': {  // APPEND
                const Ptr v = pop();
                list_at_top().push_back(v);
                break;
            }
            case 'e': {  // APPENDS
                Items items = pop_mark();
                Items& list = list_at_top();
                list.insert(list.end(), items.begin(), items.end());
                break;
            }
            case 's': {  // SETITEM
                const Ptr v = pop(), k = pop();
                dict_at_top().items.emplace_back(k, v);
                break;
            }
            case 'u': {  // SETITEMS
                Items items = pop_mark();
                if (items.size() % 2) fail(ErrorCode::bad_input, "pickle: SETITEMS with an odd number of values");
                Dict& dict = dict_at_top();
                for (std::size_t i = 0; i < items.size(); i += 2) dict.items.emplace_back(items[i], items[i + 1]);
                break;
            }
            case 'Q': {  // BINPERSID
                push(persistent(pop()));
                break;
            }
            case 'R': {  // REDUCE
                const Ptr args = pop(), callable = pop();
                push(reduce(callable, args));
                break;
            }
            case 'b': {  // BUILD: only an empty state is accepted (nothing to run)
                const Ptr state = pop();
                top();
                const bool empty = std::holds_alternative<None>(state->v) ||
                                   (std::holds_alternative<Dict>(state->v) && std::get<Dict>(state->v).items.empty());
                if (!empty) fail(ErrorCode::unsupported, "pickle: BUILD with a state ({}) is not supported", describe(state));
                break;
            }
            case '0': pop(); break;  // POP
            case '1': pop_mark(); break;  // POP_MARK
            case '2': push(top()); break;  // DUP
            default:
                fail(ErrorCode::unsupported, "pickle: opcode {:#04x} at byte {} is not one a state dict needs", op, pos_ - 1);
            }
        }
    }

private:
    std::byte byte() {
        if (pos_ >= d_.size()) fail(ErrorCode::bad_input, "pickle ends without STOP");
        return d_[pos_++];
    }
    std::span<const std::byte> take(std::uint64_t n) {
        if (n > d_.size() - pos_) fail(ErrorCode::bad_input, "pickle ends inside an argument");
        const auto s = d_.subspan(pos_, static_cast<std::size_t>(n));
        pos_ += static_cast<std::size_t>(n);
        return s;
    }
    std::uint64_t uint(int n) {
        std::uint64_t v = 0;
        const auto b = take(static_cast<std::uint64_t>(n));
        for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<std::uint8_t>(b[static_cast<std::size_t>(i)]);
        return v;
    }
    std::string text(std::uint64_t n) {
        const auto b = take(n);
        return std::string(reinterpret_cast<const char*>(b.data()), b.size());
    }
    std::string line() {
        std::string s;
        for (;;) {
            const char c = static_cast<char>(byte());
            if (c == '\n') return s;
            if (s.size() > 256) fail(ErrorCode::bad_input, "pickle: a GLOBAL name longer than 256 bytes");
            s += c;
        }
    }
    void push(Ptr p) { stack_.push_back(std::move(p)); }
    Ptr pop() {
        if (stack_.size() <= (marks_.empty() ? 0 : marks_.back()))
            fail(ErrorCode::bad_input, "pickle: stack underflow at byte {}", pos_ - 1);
        Ptr p = std::move(stack_.back());
        stack_.pop_back();
        return p;
    }
    const Ptr& top() {
        if (stack_.size() <= (marks_.empty() ? 0 : marks_.back()))
            fail(ErrorCode::bad_input, "pickle: stack underflow at byte {}", pos_ - 1);
        return stack_.back();
    }
    Ptr get(std::uint64_t index) {
        const auto it = memo_.find(index);
        if (it == memo_.end()) fail(ErrorCode::bad_input, "pickle: memo entry {} was never stored", index);
        return it->second;
    }
    Items pop_mark() {
        if (marks_.empty()) fail(ErrorCode::bad_input, "pickle: no MARK on the stack at byte {}", pos_ - 1);
        const std::size_t m = marks_.back();
        marks_.pop_back();
        Items items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(m)), std::make_move_iterator(stack_.end()));
        stack_.resize(m);
        return items;
    }
    Items pop_n(std::size_t n) {
        Items items(n);
        for (std::size_t i = n; i-- > 0;) items[i] = pop();
        return items;
    }
    Items& list_at_top() {
        auto* l = std::get_if<List>(&top()->v);
        if (!l) fail(ErrorCode::bad_input, "pickle: APPEND to a {}", describe(top()));
        return l->items;
    }
    Dict& dict_at_top() {
        auto* d = std::get_if<Dict>(&top()->v);
        if (!d) fail(ErrorCode::bad_input, "pickle: SETITEM on a {}", describe(top()));
        return *d;
    }
    Ptr global(Global g) {
        if (!allowed_global(g))
            fail(ErrorCode::unsupported, "pickle: refusing global {}.{} (only tensor state dicts are read)", g.module, g.name);
        return make(std::move(g));
    }
    Ptr persistent(const Ptr& pid) {
        const Items& t = as_tuple(pid, "a persistent id");
        if (t.size() != 5) fail(ErrorCode::bad_input, "pickle: a persistent id of {} fields, expected 5", t.size());
        const auto* tag = std::get_if<std::string>(&t[0]->v);
        const auto* type = std::get_if<Global>(&t[1]->v);
        const auto* key = std::get_if<std::string>(&t[2]->v);
        if (!tag || *tag != "storage" || !type || !key) fail(ErrorCode::bad_input, "pickle: a persistent id that is not a storage");
        const auto dtype = storage_dtype(type->name);
        if (type->module != "torch" || !dtype) fail(ErrorCode::bad_input, "pickle: storage of type {}.{}", type->module, type->name);
        const std::int64_t numel = as_int(t[4], "a storage size");
        if (numel < 0) fail(ErrorCode::bad_input, "pickle: storage {} has negative size", quote(*key));
        return make(Storage{*dtype, *key, numel});
    }
    Ptr reduce(const Ptr& callable, const Ptr& args_value) {
        const auto* g = std::get_if<Global>(&callable->v);
        if (!g) fail(ErrorCode::bad_input, "pickle: REDUCE of a {}", describe(callable));
        const Items& args = as_tuple(args_value, "REDUCE arguments");
        if (g->name == "OrderedDict") {
            if (!args.empty()) fail(ErrorCode::unsupported, "pickle: OrderedDict with arguments");
            return make(Dict{});
        }
        if (g->name == "_rebuild_parameter") {
            if (args.empty() || !std::holds_alternative<TensorRef>(args[0]->v))
                fail(ErrorCode::bad_input, "pickle: _rebuild_parameter without a tensor");
            return args[0];
        }
        if (g->name == "_rebuild_tensor_v2") {
            if (args.size() < 4) fail(ErrorCode::bad_input, "pickle: _rebuild_tensor_v2 with {} arguments", args.size());
            if (!std::holds_alternative<Storage>(args[0]->v)) fail(ErrorCode::bad_input, "pickle: a tensor without a storage");
            TensorRef t;
            t.storage = args[0];
            t.offset = as_int(args[1], "a storage offset");
            for (const auto& s : as_tuple(args[2], "a tensor size")) t.size.push_back(as_int(s, "a dimension"));
            for (const auto& s : as_tuple(args[3], "a tensor stride")) t.stride.push_back(as_int(s, "a stride"));
            if (t.size.size() != t.stride.size()) fail(ErrorCode::bad_input, "pickle: tensor size and stride differ in length");
            return make(std::move(t));
        }
        fail(ErrorCode::unsupported, "pickle: cannot call {}.{}", g->module, g->name);
    }

    Ptr make(auto x) {
        arena_.push_back(Value{std::move(x)});
        return &arena_.back();
    }

    std::deque<Value> arena_;  // owns every value (stable addresses)
    std::span<const std::byte> d_;
    std::size_t pos_ = 0;
    std::vector<Ptr> stack_;
    std::vector<std::size_t> marks_;
    std::map<std::uint64_t, Ptr> memo_;
};


struct Flattener {
    std::span<const std::byte> bytes;
    const std::map<std::string, const ZipEntry*>& storages;  // key -> entry
    std::shared_ptr<const void> owner;
    std::vector<TensorEntry> entries;
    std::map<std::string, std::string> metadata;
    std::map<std::string, bool> seen;

    TensorEntry tensor(const std::string& name, const TensorRef& t) {
        const auto& s = std::get<Storage>(t.storage->v);
        const auto it = storages.find(s.key);
        if (it == storages.end()) fail(ErrorCode::bad_input, "tensor {}: storage {} is not in the archive", quote(name), quote(s.key));
        const ZipEntry& z = *it->second;
        if (z.method != 0)
            fail(ErrorCode::unsupported, "tensor {}: storage {} is compressed (zip method {}); torch.save stores them", quote(name),
                 quote(s.key), z.method);
        const std::uint64_t es = dtype_size(s.dtype);
        if (static_cast<std::uint64_t>(s.numel) > z.size / es)
            fail(ErrorCode::bad_input, "tensor {}: storage {} holds {} bytes, not {} elements of {}", quote(name), quote(s.key),
                 z.size, s.numel, dtype_name(s.dtype));
        // Bounds: the largest element index the view reaches must lie in the storage.
        // Every size is bounded, zero or not: an empty tensor's other dimensions are still
        // multiplied by code downstream.
        std::int64_t nonzero = 1, last = t.offset;
        bool empty = false;
        if (t.offset < 0) fail(ErrorCode::bad_input, "tensor {}: negative storage offset", quote(name));
        for (std::size_t i = 0; i < t.size.size(); ++i) {
            if (t.size[i] < 0 || t.stride[i] < 0) fail(ErrorCode::bad_input, "tensor {}: negative size or stride", quote(name));
            if (t.size[i] > (std::int64_t{1} << 48) || t.stride[i] > (std::int64_t{1} << 48))
                fail(ErrorCode::bad_input, "tensor {}: implausible size or stride", quote(name));
            if (t.size[i] == 0) {
                empty = true;
                continue;
            }
            if (nonzero > (std::int64_t{1} << 48) / t.size[i]) fail(ErrorCode::bad_input, "tensor {}: too many elements", quote(name));
            nonzero *= t.size[i];
            std::int64_t reach = 0;
            if (__builtin_mul_overflow(t.size[i] - 1, t.stride[i], &reach) || __builtin_add_overflow(last, reach, &last))
                fail(ErrorCode::bad_input, "tensor {}: its strides reach beyond 64-bit offsets", quote(name));
        }
        const std::int64_t count = empty ? 0 : nonzero;
        if (count && last >= s.numel)
            fail(ErrorCode::bad_input, "tensor {}: reaches element {} of a storage of {}", quote(name), last, s.numel);
        TensorEntry e;
        e.name = name;
        e.dtype_name = std::string(dtype_name(s.dtype));
        e.shape = Shape(t.size.begin(), t.size.end());
        e.offset = z.data_offset + static_cast<std::uint64_t>(t.offset) * es;
        e.size = static_cast<std::uint64_t>(count) * es;
        bool contiguous = true;
        std::int64_t expected = 1;
        for (std::size_t i = t.size.size(); i-- > 0;) {
            if (t.size[i] != 1 && t.stride[i] != expected) contiguous = false;
            expected *= t.size[i];
        }
        const auto storage = bytes.subspan(static_cast<std::size_t>(z.data_offset), static_cast<std::size_t>(z.size));
        if (contiguous || count == 0) {
            e.tensor = Tensor::alias(s.dtype, e.shape,
                                     storage.subspan(static_cast<std::size_t>(t.offset * static_cast<std::int64_t>(es)),
                                                     static_cast<std::size_t>(e.size)),
                                     owner);
        } else {
            std::vector<std::byte> out(static_cast<std::size_t>(e.size));
            std::vector<std::int64_t> index(t.size.size(), 0);
            for (std::int64_t n = 0; n < count; ++n) {
                std::int64_t at = t.offset;
                for (std::size_t i = 0; i < index.size(); ++i) at += index[i] * t.stride[i];
                std::memcpy(out.data() + static_cast<std::size_t>(n) * es, storage.data() + static_cast<std::size_t>(at) * es, es);
                for (std::size_t i = index.size(); i-- > 0;) {
                    if (++index[i] < t.size[i]) break;
                    index[i] = 0;
                }
            }
            e.tensor = Tensor::own(s.dtype, e.shape, std::move(out));
        }
        return e;
    }

    void walk(const Dict& dict, const std::string& prefix, int depth) {
        if (depth > 8) fail(ErrorCode::unsupported, "state dict nested more than 8 levels");
        for (const auto& [k, v] : dict.items) {
            std::string key;
            if (const auto* s = std::get_if<std::string>(&k->v)) key = *s;
            else if (const auto* i = std::get_if<std::int64_t>(&k->v)) key = std::to_string(*i);
            else fail(ErrorCode::bad_input, "state dict key is a {}", describe(k));
            const std::string name = prefix.empty() ? key : prefix + "." + key;
            if (const auto* t = std::get_if<TensorRef>(&v->v)) {
                if (seen[name]) fail(ErrorCode::bad_input, "duplicate tensor name {}", quote(name));
                seen[name] = true;
                entries.push_back(tensor(name, *t));
            } else if (const auto* d = std::get_if<Dict>(&v->v)) {
                walk(*d, name, depth + 1);
            } else if (const auto* s = std::get_if<std::string>(&v->v)) {
                metadata[name] = *s;
            } else if (const auto* i = std::get_if<std::int64_t>(&v->v)) {
                metadata[name] = std::to_string(*i);
            } else if (const auto* f = std::get_if<double>(&v->v)) {
                metadata[name] = fmt::format("{}", *f);
            }
            // Other values (lists, None, ...) carry no tensors a LoRA needs.
        }
    }
};

}  // namespace

int PytorchPickleDriver::identify(std::span<const std::byte> head, const std::filesystem::path& path) const {
    if (head.size() >= 4 && std::memcmp(head.data(), "PK\x03\x04", 4) == 0) return 90;
    if (!head.empty() && head[0] == std::byte{0x80}) {
        const auto ext = path.extension();
        if (ext == ".bin" || ext == ".pt" || ext == ".pth" || ext == ".ckpt") return 60;
    }
    return 0;
}

std::unique_ptr<TensorFile> PytorchPickleDriver::open(std::shared_ptr<const MappedFile> file) const {
    return read_pytorch_pickle(std::move(file));
}

std::unique_ptr<TensorFile> read_pytorch_pickle(std::shared_ptr<const MappedFile> file) {
    const auto bytes = file->bytes();
    if (!bytes.empty() && bytes[0] == std::byte{0x80})
        fail(ErrorCode::unsupported,
             "a legacy (pre-zip) torch.save pickle; re-save it with a current PyTorch or as safetensors");
    if (bytes.size() < 4 || std::memcmp(bytes.data(), "PK\x03\x04", 4) != 0)
        fail(ErrorCode::bad_input, "not a PyTorch zip checkpoint");
    const std::vector<ZipEntry> entries = read_zip(bytes);
    const ZipEntry* pickle = nullptr;
    std::string prefix;
    for (const auto& e : entries) {
        const auto slash = e.name.find('/');
        if (slash != std::string::npos && e.name.substr(slash) == "/data.pkl") {
            if (pickle) fail(ErrorCode::bad_input, "the archive holds more than one data.pkl");
            pickle = &e;
            prefix = e.name.substr(0, slash + 1);
        }
    }
    if (!pickle) fail(ErrorCode::bad_input, "zip archive without <name>/data.pkl: not a torch.save checkpoint");
    if (pickle->method != 0) fail(ErrorCode::unsupported, "data.pkl is compressed (zip method {})", pickle->method);
    std::map<std::string, const ZipEntry*> storages;
    std::map<std::string, std::string> metadata;
    for (const auto& e : entries) {
        if (e.name.starts_with(prefix + "data/")) storages[e.name.substr(prefix.size() + 5)] = &e;
        if (e.name == prefix + "byteorder" && e.method == 0) {
            const std::string order(reinterpret_cast<const char*>(bytes.data() + e.data_offset), static_cast<std::size_t>(e.size));
            if (order != "little") fail(ErrorCode::unsupported, "a {}-endian checkpoint", order);
        }
        if (e.name == prefix + "version" && e.method == 0 && e.size < 16) {
            std::string v(reinterpret_cast<const char*>(bytes.data() + e.data_offset), static_cast<std::size_t>(e.size));
            while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) v.pop_back();
            metadata["pytorch.archive_version"] = v;
        }
    }
    Unpickler unpickler(bytes.subspan(static_cast<std::size_t>(pickle->data_offset), static_cast<std::size_t>(pickle->size)));
    const Ptr root = unpickler.run();
    const auto* dict = std::get_if<Dict>(&root->v);
    if (!dict) fail(ErrorCode::bad_input, "the checkpoint holds a {}, not a state dict", describe(root));
    Flattener flat{bytes, storages, file, {}, {}, {}};
    flat.walk(*dict, "", 0);
    for (auto& [k, v] : metadata) flat.metadata[k] = v;
    return std::make_unique<ParsedTensorFile>("pytorch-pickle", std::move(file), std::move(flat.entries), std::move(flat.metadata));
}

}  // namespace lorakit::formats
