// Placeholder: being implemented.
#include "lorakit/linalg.h"

#include "lorakit/error.h"

namespace lorakit::linalg {

struct Workspace::Impl {};
Workspace::Workspace() : impl_(new Impl) {}
Workspace::~Workspace() { delete impl_; }
Workspace::Workspace(Workspace&& other) noexcept : impl_(other.impl_) { other.impl_ = nullptr; }
Workspace& Workspace::operator=(Workspace&& other) noexcept {
    std::swap(impl_, other.impl_);
    return *this;
}
std::vector<double> factored_singular_values(std::span<const LowRankTerm>, Workspace&) {
    fail(ErrorCode::internal, "not implemented");
}
FactoredSvd factored_svd(std::span<const LowRankTerm>, std::int64_t, Workspace&) {
    fail(ErrorCode::internal, "not implemented");
}
std::vector<double> dense_singular_values(const float*, std::int64_t, std::int64_t) {
    fail(ErrorCode::internal, "not implemented");
}
void set_blas_threads(int) noexcept {}
int blas_threads() noexcept { return 1; }

}  // namespace lorakit::linalg
