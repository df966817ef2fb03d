// A TensorFile over a mapped file whose entries a container parser has already built (the
// tensors point into the mapping, which this object keeps alive).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lorakit/registry.h"

namespace lorakit::formats {

class ParsedTensorFile final : public TensorFile {
public:
    ParsedTensorFile(std::string_view format, std::shared_ptr<const MappedFile> file, std::vector<TensorEntry> entries,
                     std::map<std::string, std::string> metadata)
        : format_(format), file_(std::move(file)), entries_(std::move(entries)), metadata_(std::move(metadata)) {
        build_index();
    }
    std::string_view format_name() const override { return format_; }
    const std::string& name() const override { return file_->name(); }
    const std::vector<TensorEntry>& entries() const override { return entries_; }
    const std::map<std::string, std::string>& metadata() const override { return metadata_; }
    void release(const TensorEntry& entry) const override { file_->release(entry.tensor.bytes()); }
    void prefetch(const TensorEntry& entry) const override {
        const auto bytes = entry.tensor.bytes(), all = file_->bytes();
        if (!bytes.empty() && bytes.data() >= all.data() && bytes.data() + bytes.size() <= all.data() + all.size())
            file_->prefetch(static_cast<std::size_t>(bytes.data() - all.data()), bytes.size());
    }

private:
    std::string_view format_;  // a string literal
    std::shared_ptr<const MappedFile> file_;
    std::vector<TensorEntry> entries_;
    std::map<std::string, std::string> metadata_;
};

}  // namespace lorakit::formats
