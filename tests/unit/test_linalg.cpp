// The factored SVD against dense LAPACK on the formed product, for random small cases.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "lorakit/error.h"
#include "lorakit/linalg.h"
#include "lorakit/mapped_file.h"
#include "lorakit/tensor.h"
#include "gram_kernels.h"
#include "small_eigen.h"
#include "parallel.h"
#include "lorakit/progress.h"
#include "support.h"

using namespace lorakit;
using namespace lorakit::linalg;

namespace {

struct Factor {
    std::vector<float> b, a;
    std::int64_t out, rank, in;
    double coefficient;
    LowRankTerm term() const { return {b.data(), a.data(), out, rank, in, coefficient}; }
};

Factor random_factor(std::mt19937& g, std::int64_t out, std::int64_t rank, std::int64_t in, double c) {
    std::normal_distribution<float> d;
    Factor f{std::vector<float>(static_cast<std::size_t>(out * rank)), std::vector<float>(static_cast<std::size_t>(rank * in)),
             out, rank, in, c};
    for (auto& x : f.b) x = d(g);
    for (auto& x : f.a) x = d(g);
    return f;
}

// Σ c_i B_i A_i formed densely in double, returned as f32 row-major.
std::vector<double> dense_sum(const std::vector<Factor>& fs) {
    const auto out = fs[0].out, in = fs[0].in;
    std::vector<double> m(static_cast<std::size_t>(out * in), 0.0);
    for (const auto& f : fs)
        for (std::int64_t i = 0; i < out; ++i)
            for (std::int64_t k = 0; k < f.rank; ++k) {
                const double bik = f.coefficient * f.b[static_cast<std::size_t>(i * f.rank + k)];
                for (std::int64_t j = 0; j < in; ++j) m[static_cast<std::size_t>(i * in + j)] += bik * f.a[static_cast<std::size_t>(k * in + j)];
            }
    return m;
}

std::vector<double> dense_values(const std::vector<double>& m, std::int64_t rows, std::int64_t cols) {
    std::vector<float> f(m.begin(), m.end());
    return dense_singular_values(f.data(), rows, cols);
}

std::vector<LowRankTerm> terms_of(const std::vector<Factor>& fs) {
    std::vector<LowRankTerm> t;
    for (const auto& f : fs) t.push_back(f.term());
    return t;
}

void check_values(const std::vector<double>& got, const std::vector<double>& reference, std::size_t expected_count) {
    REQUIRE(got.size() == expected_count);
    const double top = reference.empty() ? 0.0 : reference.front();
    for (std::size_t i = 0; i < got.size(); ++i) {
        const double want = i < reference.size() ? reference[i] : 0.0;
        CHECK(std::abs(got[i] - want) <= 1e-5 * std::max(top, 1e-30) + 1e-30);
        if (i) CHECK(got[i] <= got[i - 1] * (1 + 1e-12) + 1e-30);
    }
}

}  // namespace

TEST_CASE("factored singular values match dense LAPACK", "[linalg]") {
    struct Shape3 {
        std::int64_t out, rank, in;
    };
    const Shape3 shapes[] = {{16, 4, 24}, {24, 4, 16}, {5, 8, 40}, {40, 8, 5}, {1, 3, 10}, {10, 1, 1},
                             {64, 1, 64}, {33, 16, 17}, {7, 7, 7}, {48, 6, 3 * 3 * 5}};
    Workspace workspace;
    for (unsigned seed : {1u, 2u, 3u}) {
        std::mt19937 g(seed);
        for (const auto& s : shapes) {
            INFO("seed " << seed << " shape " << s.out << "x" << s.rank << "x" << s.in);
            const std::vector<Factor> fs = {random_factor(g, s.out, s.rank, s.in, 0.37)};
            const auto reference = dense_values(dense_sum(fs), s.out, s.in);
            const auto expected = static_cast<std::size_t>(std::min({s.out, s.in, s.rank}));
            const auto terms = terms_of(fs);
            check_values(factored_singular_values(terms, workspace), reference, expected);
            check_values(factored_singular_values_householder(terms, workspace), reference, expected);
        }
    }
}

TEST_CASE("sums of terms, negative and zero coefficients, duplicated (rank-deficient) stacks", "[linalg]") {
    Workspace workspace;
    for (unsigned seed : {4u, 5u, 6u}) {
        std::mt19937 g(seed);
        std::vector<Factor> fs = {random_factor(g, 30, 4, 20, 1.0), random_factor(g, 30, 6, 20, -0.5),
                                  random_factor(g, 30, 2, 20, 0.0)};
        fs.push_back(fs[0]);  // the same term twice: the stack has rank 10, not 16
        fs.back().coefficient = 2.0;
        const auto reference = dense_values(dense_sum(fs), 30, 20);
        const auto got = factored_singular_values(terms_of(fs), workspace);
        check_values(got, reference, 16);
        CHECK(got[10] <= 1e-5 * got[0]);  // the numerical rank is 10
        check_values(factored_singular_values_householder(terms_of(fs), workspace), reference, 16);
    }
}

TEST_CASE("the full factored SVD reconstructs the product and truncates optimally", "[linalg]") {
    Workspace workspace;
    std::mt19937 g(7);
    const std::vector<Factor> fs = {random_factor(g, 40, 5, 30, 0.8), random_factor(g, 40, 3, 30, -1.2)};
    const auto dense = dense_sum(fs);
    const FactoredSvd full = factored_svd(terms_of(fs), 0, workspace);
    REQUIRE(full.kept == 8);
    // U·diag(S)·Vᵀ reproduces the product.
    double error = 0, norm = 0;
    for (std::int64_t i = 0; i < 40; ++i)
        for (std::int64_t j = 0; j < 30; ++j) {
            double x = 0;
            for (std::int64_t k = 0; k < full.kept; ++k)
                x += double(full.u[i * full.kept + k]) * full.singular_values[k] * double(full.v[j * full.kept + k]);
            const double want = dense[static_cast<std::size_t>(i * 30 + j)];
            error += (x - want) * (x - want);
            norm += want * want;
        }
    CHECK(std::sqrt(error / norm) < 1e-5);
    // Orthonormal columns.
    for (std::int64_t a = 0; a < full.kept; ++a)
        for (std::int64_t b = 0; b < full.kept; ++b) {
            double uu = 0, vv = 0;
            for (std::int64_t i = 0; i < 40; ++i) uu += double(full.u[i * full.kept + a]) * full.u[i * full.kept + b];
            for (std::int64_t j = 0; j < 30; ++j) vv += double(full.v[j * full.kept + a]) * full.v[j * full.kept + b];
            CHECK(std::abs(uu - (a == b)) < 1e-5);
            CHECK(std::abs(vv - (a == b)) < 1e-5);
        }
    // Rank-3 truncation: error equals sqrt(Σ_{j>3} σ_j²) (Eckart–Young).
    const FactoredSvd top = factored_svd(terms_of(fs), 3, workspace);
    REQUIRE(top.kept == 3);
    double truncation = 0, optimal = 0;
    for (std::size_t k = 3; k < top.singular_values.size(); ++k) optimal += top.singular_values[k] * top.singular_values[k];
    for (std::int64_t i = 0; i < 40; ++i)
        for (std::int64_t j = 0; j < 30; ++j) {
            double x = 0;
            for (std::int64_t k = 0; k < 3; ++k)
                x += double(top.u[i * 3 + k]) * top.singular_values[k] * double(top.v[j * 3 + k]);
            const double d = x - dense[static_cast<std::size_t>(i * 30 + j)];
            truncation += d * d;
        }
    CHECK(std::sqrt(truncation) == Approx(std::sqrt(optimal)).epsilon(1e-5));
}

TEST_CASE("zero factors and mismatched terms", "[linalg]") {
    Workspace workspace;
    std::vector<float> zeros_b(8 * 2, 0.0f), zeros_a(2 * 5, 0.0f);
    const LowRankTerm zero{zeros_b.data(), zeros_a.data(), 8, 2, 5, 1.0};
    const auto values = factored_singular_values({&zero, 1}, workspace);
    CHECK(values == std::vector<double>{0.0, 0.0});  // an untrained LoRA (B = 0)
    std::mt19937 g(8);
    const Factor f1 = random_factor(g, 8, 2, 5, 1.0), f2 = random_factor(g, 8, 2, 6, 1.0);
    const std::vector<LowRankTerm> mixed = {f1.term(), f2.term()};
    CHECK_THROWS_AS(factored_singular_values(mixed, workspace), Error);
    std::vector<float> nan_b = f1.b;
    nan_b[0] = std::numeric_limits<float>::quiet_NaN();
    const LowRankTerm bad{nan_b.data(), f1.a.data(), 8, 2, 5, 1.0};
    CHECK_THROWS_AS(factored_singular_values({&bad, 1}, workspace), Error);
}

TEST_CASE("dense_stats: energy, max |x| and finiteness in one pass", "[linalg]") {
    std::vector<float> v(1000);
    double energy = 0;
    for (std::size_t i = 0; i < v.size(); ++i) {
        v[i] = (i % 7 == 0 ? -1.0f : 1.0f) * static_cast<float>(i) * 0.01f;
        energy += double(v[i]) * v[i];
    }
    auto s = linalg::dense_stats(v.data(), v.size());
    CHECK(s.finite);
    CHECK(s.max_abs == Approx(9.99f));
    CHECK(s.sum_squares == Approx(energy).epsilon(1e-6));
    for (std::size_t count : {std::size_t(0), std::size_t(1), std::size_t(63), std::size_t(65)}) {
        const auto t = linalg::dense_stats(v.data(), count);
        float expected = 0;
        for (std::size_t i = 0; i < count; ++i) expected = std::max(expected, std::abs(v[i]));
        CHECK(t.finite);
        CHECK(t.max_abs == expected);
    }
    v[997] = std::numeric_limits<float>::infinity();
    CHECK_FALSE(linalg::dense_stats(v.data(), v.size()).finite);
    v[997] = -std::numeric_limits<float>::quiet_NaN();
    CHECK_FALSE(linalg::dense_stats(v.data(), v.size()).finite);
    CHECK(linalg::dense_stats(v.data(), 997).finite);
}

TEST_CASE("MappedFile::release drops pages but never the data", "[core]") {
    lorakit::test::ScratchDir dir;
    std::string bytes(3 * 4096 + 100, '\0');
    for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 31 + 7);
    lorakit::test::write_file(dir / "f", bytes);
    const auto file = MappedFile::open(dir / "f");
    file->release(file->bytes().subspan(10, 3 * 4096));
    file->release(file->bytes());
    CHECK(std::equal(bytes.begin(), bytes.end(), reinterpret_cast<const char*>(file->bytes().data())));
    // Bytes that are not a mapping are left alone.
    std::vector<std::byte> memory(8192, std::byte{5});
    const auto in_memory = MappedFile::from_bytes("memory", memory);
    in_memory->release(in_memory->bytes());
    CHECK(in_memory->bytes()[100] == std::byte{5});
    file->release(std::span<const std::byte>(memory));  // outside the mapping: no-op
    CHECK(memory[4096] == std::byte{5});
}

TEST_CASE("factored_lora writes the split factors of the best rank-k approximation straight into reused buffers",
          "[linalg]") {
    Workspace workspace;
    std::mt19937 g(11);
    // Rank-deficient sum: the second term repeats the first's B (the stacked B has rank 7 of 9).
    std::vector<Factor> fs = {random_factor(g, 50, 4, 36, 0.7), random_factor(g, 50, 2, 36, -1.1),
                              random_factor(g, 50, 3, 36, 0.4)};
    for (std::int64_t i = 0; i < 50; ++i)
        for (std::int64_t k = 0; k < 2; ++k) fs[1].b[static_cast<std::size_t>(i * 2 + k)] = fs[0].b[static_cast<std::size_t>(i * 4 + k)];
    const auto dense = dense_sum(fs);
    const FactoredSvd svd = factored_svd(terms_of(fs), 0, workspace);
    // up·down against U_k Σ_k V_kᵀ from factored_svd, for both splits and widths below, at and above
    // the number of directions; buffers start dirty and are reused across calls.
    std::vector<float> up(10000, 123.0f), down(10000, -7.0f);
    for (const bool balanced : {false, true})
        for (const std::int64_t width : {3, 7, 12}) {
            DYNAMIC_SECTION("balanced " << balanced << ", width " << width) {
                const FactoredLora f = factored_lora(
                    terms_of(fs), [&](const std::vector<double>& values) {
                        CHECK(values.size() == 9);
                        return width;
                    },
                    balanced, workspace, up, down);
                REQUIRE(f.rank == width);
                CHECK(f.kept == std::min<std::int64_t>(width, 9));
                REQUIRE(up.size() == static_cast<std::size_t>(50 * width));
                REQUIRE(down.size() == static_cast<std::size_t>(width * 36));
                for (std::size_t k = 0; k < svd.singular_values.size(); ++k)
                    CHECK(f.singular_values[k] == Approx(svd.singular_values[k]).epsilon(1e-9).margin(1e-9));
                double error = 0, norm = 0, optimal = 0;
                for (std::size_t k = static_cast<std::size_t>(width); k < svd.singular_values.size(); ++k)
                    optimal += svd.singular_values[k] * svd.singular_values[k];
                for (std::int64_t i = 0; i < 50; ++i)
                    for (std::int64_t j = 0; j < 36; ++j) {
                        double x = 0;
                        for (std::int64_t k = 0; k < width; ++k)
                            x += double(up[static_cast<std::size_t>(i * width + k)]) * down[static_cast<std::size_t>(k * 36 + j)];
                        const double want = dense[static_cast<std::size_t>(i * 36 + j)];
                        error += (x - want) * (x - want);
                        norm += want * want;
                    }
                // Eckart–Young: the error is the dropped tail (0 once every direction is kept).
                CHECK(std::sqrt(error) == Approx(std::sqrt(optimal)).margin(1e-5 * std::sqrt(norm)));
                // Directions past the sum's rank (7) are numerically zero; past kept exactly zero.
                for (std::int64_t k = 9; k < width; ++k) {
                    for (std::int64_t i = 0; i < 50; ++i) CHECK(up[static_cast<std::size_t>(i * width + k)] == 0.0f);
                    for (std::int64_t j = 0; j < 36; ++j) CHECK(down[static_cast<std::size_t>(k * 36 + j)] == 0.0f);
                }
                // The split: unbalanced puts Σ on up (down rows orthonormal); balanced √Σ on each.
                for (std::int64_t k = 0; k < std::min<std::int64_t>(width, 7); ++k) {
                    double up2 = 0, down2 = 0;
                    for (std::int64_t i = 0; i < 50; ++i) up2 += std::pow(double(up[static_cast<std::size_t>(i * width + k)]), 2);
                    for (std::int64_t j = 0; j < 36; ++j) down2 += std::pow(double(down[static_cast<std::size_t>(k * 36 + j)]), 2);
                    const double sigma = svd.singular_values[static_cast<std::size_t>(k)];
                    CHECK(std::sqrt(up2) == Approx(balanced ? std::sqrt(sigma) : sigma).epsilon(1e-5));
                    CHECK(std::sqrt(down2) == Approx(balanced ? std::sqrt(sigma) : 1.0).epsilon(1e-5));
                }
            }
        }
}

TEST_CASE("factors in other dtypes and unaligned are widened exactly while stacking", "[linalg]") {
    Workspace workspace;
    std::mt19937 g(11);
    for (const DType type : {DType::F16, DType::BF16, DType::F32}) {
        std::vector<Factor> fs = {random_factor(g, 24, 4, 18, 0.7), random_factor(g, 24, 3, 18, -1.3)};
        // Round the f32 factors to `type`, then store them encoded, one byte past an aligned start.
        std::vector<std::vector<std::byte>> storage;
        std::vector<LowRankTerm> encoded;
        for (auto& f : fs) {
            for (auto* values : {&f.b, &f.a}) {
                std::vector<std::byte> bytes(values->size() * dtype_size(type) + 1);
                convert_from_f32(type, values->data(), bytes.data() + 1, values->size());
                convert_to_f32(type, bytes.data() + 1, values->data(), values->size());  // f32 twin: the rounded values
                storage.push_back(std::move(bytes));
            }
            const auto& b = storage[storage.size() - 2];
            const auto& a = storage.back();
            encoded.push_back({b.data() + 1, a.data() + 1, f.out, f.rank, f.in, f.coefficient, type, type});
        }
        INFO(dtype_name(type));
        // Exactly the same stacks, so exactly the same results as the f32 twins.
        CHECK(factored_singular_values(encoded, workspace) == factored_singular_values(terms_of(fs), workspace));
        std::vector<double> gb1, ga1, gb2, ga2;
        stacked_grams(encoded, workspace, gb1, ga1);
        const Stacks s1 = stack_factors(encoded, workspace);
        CHECK(s1.total_rank == 7);
        const std::vector<float> stacked_b(s1.b, s1.b + 24 * 7), stacked_a(s1.a, s1.a + 7 * 18);
        stacked_grams(terms_of(fs), workspace, gb2, ga2);
        const Stacks s2 = stack_factors(terms_of(fs), workspace);
        CHECK(gb1 == gb2);
        CHECK(ga1 == ga2);
        CHECK(stacked_b == std::vector<float>(s2.b, s2.b + 24 * 7));
        CHECK(stacked_a == std::vector<float>(s2.a, s2.a + 7 * 18));
        // The returned stacks are the B_i side by side, without their coefficients (those scale
        // G_b), and the A_i one under the other.
        CHECK(s2.b[5 * 7 + 4 + 1] == fs[1].b[5 * 3 + 1]);
        // G_b carries the coefficients: entry (2, 4 + 1) = c_1 c_2 Σ_o B_1[o, 2] B_2[o, 1].
        double cross = 0, size = 0;
        for (std::int64_t o = 0; o < 24; ++o) {
            const double term = double(fs[0].b[static_cast<std::size_t>(o * 4 + 2)]) * fs[1].b[static_cast<std::size_t>(o * 3 + 1)];
            cross += term;
            size += std::abs(term);
        }
        CHECK(std::abs(gb2[2 + 5 * 7] - fs[0].coefficient * fs[1].coefficient * cross) <= 1e-6 * size);
        CHECK(gb2[5 + 2 * 7] == gb2[2 + 5 * 7]);
        CHECK(s2.a[(4 + 2) * 18 + 9] == fs[1].a[2 * 18 + 9]);
    }
}

TEST_CASE("a lone f32 term with coefficient 1 is read in place, with the results of a copied stack", "[linalg]") {
    // lora-resize's case: the factors are used where they lie (mapped). The same values one byte
    // off alignment, or with another coefficient, go through the copying route; both must agree.
    Workspace workspace;
    std::mt19937 g(31);
    const Factor f = random_factor(g, 40, 6, 33, 1.0);
    const LowRankTerm aligned = f.term();
    std::vector<std::byte> bytes_b(f.b.size() * 4 + 1), bytes_a(f.a.size() * 4 + 1);
    std::memcpy(bytes_b.data() + 1, f.b.data(), f.b.size() * 4);
    std::memcpy(bytes_a.data() + 1, f.a.data(), f.a.size() * 4);
    LowRankTerm unaligned = aligned;
    unaligned.b = bytes_b.data() + 1;
    unaligned.a = bytes_a.data() + 1;
    const auto keep = [](const std::vector<double>&) -> std::int64_t { return 4; };
    std::vector<float> up1, down1, up2, down2;
    const FactoredLora in_place = factored_lora({&aligned, 1}, keep, false, workspace, up1, down1);
    const FactoredLora copied = factored_lora({&unaligned, 1}, keep, false, workspace, up2, down2);
    CHECK(in_place.singular_values == copied.singular_values);
    CHECK(up1 == up2);
    CHECK(down1 == down2);
    const FactoredSvd s1 = factored_svd({&aligned, 1}, 4, workspace), s2 = factored_svd({&unaligned, 1}, 4, workspace);
    CHECK(s1.u == s2.u);
    CHECK(s1.v == s2.v);
    // The inputs are untouched, and a coefficient of 2 doubles the singular values.
    for (std::size_t i = 0; i < f.b.size(); ++i) REQUIRE(static_cast<const float*>(aligned.b)[i] == f.b[i]);
    LowRankTerm doubled = aligned;
    doubled.coefficient = 2.0;
    const FactoredSvd s3 = factored_svd({&doubled, 1}, 4, workspace);
    for (std::size_t k = 0; k < 4; ++k) CHECK(s3.singular_values[k] == Approx(2 * s1.singular_values[k]).epsilon(1e-12));
}

TEST_CASE("gram_svd: the SVD of B·A from its Grams alone", "[linalg]") {
    Workspace workspace;
    for (unsigned seed : {12u, 13u}) {
        std::mt19937 g(seed);
        // Three blocks, the third a copy of the first: rank 9 of R = 13.
        std::vector<Factor> fs = {random_factor(g, 30, 4, 22, 1.0), random_factor(g, 30, 5, 22, 1.0)};
        fs.push_back(fs[0]);
        const std::int64_t R = 13, out = 30, in = 22;
        // B (out x R) and A (R x in), row-major, in double, and their Grams.
        std::vector<double> b(static_cast<std::size_t>(out * R)), a(static_cast<std::size_t>(R * in));
        std::int64_t column = 0;
        for (const auto& f : fs) {
            for (std::int64_t o = 0; o < out; ++o)
                for (std::int64_t k = 0; k < f.rank; ++k) b[static_cast<std::size_t>(o * R + column + k)] = f.b[static_cast<std::size_t>(o * f.rank + k)];
            for (std::int64_t k = 0; k < f.rank; ++k)
                for (std::int64_t j = 0; j < in; ++j) a[static_cast<std::size_t>((column + k) * in + j)] = f.a[static_cast<std::size_t>(k * in + j)];
            column += f.rank;
        }
        std::vector<double> gb(static_cast<std::size_t>(R * R)), ga(static_cast<std::size_t>(R * R));
        for (std::int64_t i = 0; i < R; ++i)
            for (std::int64_t j = 0; j < R; ++j) {
                double x = 0, y = 0;
                for (std::int64_t o = 0; o < out; ++o) x += b[static_cast<std::size_t>(o * R + i)] * b[static_cast<std::size_t>(o * R + j)];
                for (std::int64_t q = 0; q < in; ++q) y += a[static_cast<std::size_t>(i * in + q)] * a[static_cast<std::size_t>(j * in + q)];
                gb[static_cast<std::size_t>(i + j * R)] = x;
                ga[static_cast<std::size_t>(i + j * R)] = y;
            }
        const auto dense = dense_sum(fs);
        const auto reference = dense_values(dense, out, in);
        const GramSvd all = gram_svd(gb, ga, R, [](const std::vector<double>& s) { return static_cast<std::int64_t>(s.size()); },
                                     -1.0, workspace);
        REQUIRE(all.singular_values.size() == static_cast<std::size_t>(R));
        check_values(std::vector<double>(all.singular_values.begin(), all.singular_values.begin() + 13), reference, 13);
        CHECK(all.singular_values[9] == 0.0);  // past the rank: exactly zero, and no direction
        // U = B·X and V = Aᵀ·Y: orthonormal, and U Σ Vᵀ is the product.
        const std::int64_t k = all.k;
        REQUIRE(k == R);
        std::vector<double> u(static_cast<std::size_t>(out * k), 0.0), v(static_cast<std::size_t>(in * k), 0.0);
        for (std::int64_t o = 0; o < out; ++o)
            for (std::int64_t c = 0; c < k; ++c)
                for (std::int64_t i = 0; i < R; ++i)
                    u[static_cast<std::size_t>(o * k + c)] += b[static_cast<std::size_t>(o * R + i)] * all.x[static_cast<std::size_t>(i + c * R)];
        for (std::int64_t q = 0; q < in; ++q)
            for (std::int64_t c = 0; c < k; ++c)
                for (std::int64_t i = 0; i < R; ++i)
                    v[static_cast<std::size_t>(q * k + c)] += a[static_cast<std::size_t>(i * in + q)] * all.y[static_cast<std::size_t>(i + c * R)];
        double error = 0, norm = 0;
        for (std::int64_t o = 0; o < out; ++o)
            for (std::int64_t q = 0; q < in; ++q) {
                double x = 0;
                for (std::int64_t c = 0; c < k; ++c)
                    x += u[static_cast<std::size_t>(o * k + c)] * all.singular_values[static_cast<std::size_t>(c)] * v[static_cast<std::size_t>(q * k + c)];
                const double want = dense[static_cast<std::size_t>(o * in + q)];
                error += (x - want) * (x - want);
                norm += want * want;
            }
        CHECK(std::sqrt(error / norm) < 1e-10);
        for (std::int64_t c1 = 0; c1 < 9; ++c1)
            for (std::int64_t c2 = 0; c2 < 9; ++c2) {
                double uu = 0, vv = 0;
                for (std::int64_t o = 0; o < out; ++o) uu += u[static_cast<std::size_t>(o * k + c1)] * u[static_cast<std::size_t>(o * k + c2)];
                for (std::int64_t q = 0; q < in; ++q) vv += v[static_cast<std::size_t>(q * k + c1)] * v[static_cast<std::size_t>(q * k + c2)];
                CHECK(std::abs(uu - (c1 == c2)) < 1e-10);
                CHECK(std::abs(vv - (c1 == c2)) < 1e-10);
            }
        for (std::int64_t c = 9; c < k; ++c)
            for (std::int64_t i = 0; i < R; ++i) CHECK(all.x[static_cast<std::size_t>(i + c * R)] == 0.0);
        // keep() sees the values and chooses k: X and Y have that many columns.
        const GramSvd top = gram_svd(gb, ga, R, [](const std::vector<double>&) { return std::int64_t{3}; }, 1e-13, workspace);
        CHECK(top.k == 3);
        CHECK(top.x.size() == static_cast<std::size_t>(3 * R));
        CHECK(top.y.size() == static_cast<std::size_t>(3 * R));
        CHECK(top.singular_values[0] == Approx(all.singular_values[0]).epsilon(1e-12));
    }
    const std::vector<double> zero(4, 0.0);
    const GramSvd none = gram_svd(zero, zero, 2, [](const std::vector<double>&) { return std::int64_t{2}; }, -1.0, workspace);
    CHECK(none.singular_values == std::vector<double>{0.0, 0.0});
    CHECK(std::all_of(none.x.begin(), none.x.end(), [](double x) { return x == 0.0; }));
    CHECK_THROWS_AS(gram_svd(zero, zero, 3, [](const std::vector<double>&) { return std::int64_t{1}; }, -1.0, workspace), Error);
}

TEST_CASE("spectral_norm: a lower bound on σ_1, tight for trained-like spectra, close for flat ones", "[linalg]") {
    std::mt19937 g(21);
    std::normal_distribution<float> d;
    auto exact = [](const std::vector<float>& m, std::int64_t rows, std::int64_t cols) {
        return dense_singular_values(m.data(), rows, cols).front();
    };
    // A dominant direction over noise (σ_1/σ_2 ~ 1.5), as trained weights have.
    {
        const std::int64_t rows = 300, cols = 200;
        std::vector<float> m(static_cast<std::size_t>(rows * cols)), u(static_cast<std::size_t>(rows)), v(static_cast<std::size_t>(cols));
        for (auto& x : m) x = 0.05f * d(g);
        for (int term = 0; term < 8; ++term) {
            for (auto& x : u) x = d(g);
            for (auto& x : v) x = d(g);
            const float w = 2.0f / static_cast<float>(term + 1) / std::sqrt(static_cast<float>(rows * cols));
            for (std::int64_t i = 0; i < rows; ++i)
                for (std::int64_t j = 0; j < cols; ++j) m[static_cast<std::size_t>(i * cols + j)] += w * u[static_cast<std::size_t>(i)] * v[static_cast<std::size_t>(j)];
        }
        const double s1 = exact(m, rows, cols);
        const double estimate = spectral_norm(m.data(), rows, cols);
        CHECK(estimate <= s1 * (1 + 1e-6));
        CHECK(estimate == Approx(s1).epsilon(1e-5));
    }
    // A flat (Gaussian) spectrum: the hardest case; still a lower bound, within a few percent.
    for (const auto& [rows, cols] : {std::pair<std::int64_t, std::int64_t>{256, 256}, {128, 640}, {640, 96}}) {
        std::vector<float> m(static_cast<std::size_t>(rows * cols));
        for (auto& x : m) x = d(g);
        const double s1 = exact(m, rows, cols);
        const double estimate = spectral_norm(m.data(), rows, cols);
        CHECK(estimate <= s1 * (1 + 1e-6));
        CHECK(estimate >= 0.95 * s1);
        CHECK(spectral_norm(m.data(), rows, cols, 6, 99) <= s1 * (1 + 1e-6));  // any seed
    }
    // Rank one: the Krylov space is invariant after one block; exact.
    {
        std::vector<float> m(40 * 30);
        for (std::int64_t i = 0; i < 40; ++i)
            for (std::int64_t j = 0; j < 30; ++j) m[static_cast<std::size_t>(i * 30 + j)] = static_cast<float>((i + 1) * (j % 7 - 3));
        CHECK(spectral_norm(m.data(), 40, 30) == Approx(exact(m, 40, 30)).epsilon(1e-6));
    }
    // Tiny shapes, zeros, and non-finite values.
    const std::vector<float> one = {-3.0f};
    CHECK(spectral_norm(one.data(), 1, 1) == Approx(3.0));
    const std::vector<float> zeros(12, 0.0f);
    CHECK(spectral_norm(zeros.data(), 3, 4) == 0.0);
    std::vector<float> bad(12, 1.0f);
    bad[5] = std::numeric_limits<float>::infinity();
    CHECK_THROWS_AS(spectral_norm(bad.data(), 3, 4), Error);
}

TEST_CASE("Gram kernels: every variant on this CPU gives the Gram of rows and of columns", "[linalg][kernels]") {
    INFO("Gram kernels on this CPU: " << detail::available_gram_kernel_count() << ", chosen: "
                                      << detail::gram_kernels().name);
    CHECK(detail::available_gram_kernel(0).name == detail::portable_gram_kernels().name);
    std::mt19937 g(41);
    std::normal_distribution<float> d;
    for (const std::size_t R : {1u, 3u, 8u, 9u, 16u, 23u, 24u, 25u, 40u, 128u, 161u})
        for (const std::size_t rows : {1u, 5u, 8u, 13u, 64u}) {
            // Two chunks of rows (the kernels accumulate), as R x rows column-major and rows x R row-major.
            std::vector<float> m(2 * rows * R);
            for (auto& x : m) x = d(g);
            std::vector<double> reference(R * R, 0.0);
            for (std::size_t i = 0; i < R; ++i)
                for (std::size_t j = i; j < R; ++j)
                    for (std::size_t o = 0; o < 2 * rows; ++o)
                        reference[i + j * R] += static_cast<double>(m[o * R + i]) * m[o * R + j];
            // The transpose (R x 2·rows, row-major) for the column route, with a row stride beyond it.
            const std::size_t src_ld = 2 * rows + 3;
            std::vector<float> t(R * src_ld, std::numeric_limits<float>::quiet_NaN());
            for (std::size_t o = 0; o < 2 * rows; ++o)
                for (std::size_t k = 0; k < R; ++k) t[k * src_ld + o] = m[o * R + k];
            for (std::size_t v = 0; v < detail::available_gram_kernel_count(); ++v) {
                const auto& kernels = detail::available_gram_kernel(v);
                CAPTURE(kernels.name, R, rows);
                const std::size_t ld = kernels.stride(R);
                REQUIRE(ld >= R);
                std::vector<double> wide(ld * rows, std::numeric_limits<double>::quiet_NaN());
                std::vector<double> by_rows(ld * ld, 0.0), by_columns(ld * ld, 0.0);
                for (std::size_t half = 0; half < 2; ++half) {
                    kernels.widen_rows(m.data() + half * rows * R, R, rows, wide.data(), ld);
                    for (std::size_t o = 0; o < rows; ++o) {
                        for (std::size_t k = 0; k < R; ++k)
                            REQUIRE(wide[o * ld + k] == static_cast<double>(m[(half * rows + o) * R + k]));
                        for (std::size_t k = R; k < ld; ++k) REQUIRE(wide[o * ld + k] == 0.0);
                    }
                    kernels.accumulate_rows(wide.data(), rows, R, ld, by_rows.data());
                    std::fill(wide.begin(), wide.end(), std::numeric_limits<double>::quiet_NaN());
                    kernels.accumulate_columns(t.data() + half * rows, src_ld, R, rows, wide.data(), by_columns.data());
                }
                double worst = 0;
                for (std::size_t j = 0; j < R; ++j)
                    for (std::size_t i = 0; i <= j; ++i) {
                        const double scale = std::sqrt(reference[i + i * R] * reference[j + j * R]);
                        worst = std::max({worst, std::abs(by_rows[i + j * ld] - reference[i + j * R]) / scale,
                                          std::abs(by_columns[i + j * ld] - reference[i + j * R]) / scale});
                    }
                CHECK(worst < 1e-14);
            }
        }
}

TEST_CASE("Gram kernels: every variant's f32 product C = L·M, L read by rows or by columns", "[linalg][kernels]") {
    std::mt19937 g(43);
    std::normal_distribution<float> d;
    for (const std::size_t rows : {1u, 5u, 6u, 7u, 12u, 13u, 40u})
        for (const std::size_t cols : {1u, 15u, 16u, 17u, 32u, 48u, 64u, 65u, 130u})
            for (const std::size_t inner : {1u, 9u, 128u})
                for (const bool l_by_rows : {true, false}) {
                    // L (rows x inner) stored with row stride inner + 2 (l_r = 1) or column stride rows + 3 (l_i = 1).
                    const std::size_t l_i = l_by_rows ? inner + 2 : 1, l_r = l_by_rows ? 1 : rows + 3;
                    std::vector<float> l(l_by_rows ? rows * l_i : inner * l_r), m(inner * (cols + 5));
                    for (auto& x : l) x = d(g);
                    for (auto& x : m) x = d(g);
                    const std::size_t m_ld = cols + 5, c_ld = cols + 4;
                    for (std::size_t v = 0; v < detail::available_gram_kernel_count(); ++v) {
                        const auto& kernels = detail::available_gram_kernel(v);
                        CAPTURE(kernels.name, rows, cols, inner, l_by_rows);
                        std::vector<float> c(rows * c_ld, 7.0f);
                        std::vector<float> scratch(inner * 64, std::numeric_limits<float>::quiet_NaN());
                        kernels.product(rows, cols, inner, l.data(), l_i, l_r, m.data(), m_ld, c.data(), c_ld,
                                        scratch.data());
                        double worst = 0;
                        for (std::size_t i = 0; i < rows; ++i) {
                            for (std::size_t j = 0; j < cols; ++j) {
                                double sum = 0, magnitude = 0;
                                for (std::size_t r = 0; r < inner; ++r) {
                                    const double p = static_cast<double>(l[i * l_i + r * l_r]) * m[r * m_ld + j];
                                    sum += p;
                                    magnitude += std::abs(p);
                                }
                                worst = std::max(worst, std::abs(c[i * c_ld + j] - sum) / magnitude);
                            }
                            // Past the columns (the row stride's slack) nothing is written.
                            for (std::size_t j = cols; j < c_ld; ++j) REQUIRE(c[i * c_ld + j] == 7.0f);
                        }
                        CHECK(worst < 1e-6);
                    }
                }
}

namespace {

// Q·diag(λ)·Qᵀ (column-major n x n) with a random orthogonal Q (a product of n random Householder
// reflections), so the spectrum is known exactly up to the rounding of forming it.
std::vector<double> with_spectrum(const std::vector<double>& lambda, std::mt19937& g) {
    const std::size_t n = lambda.size();
    std::normal_distribution<double> d;
    std::vector<double> q(n * n, 0.0);
    for (std::size_t i = 0; i < n; ++i) q[i + i * n] = 1.0;
    for (std::size_t r = 0; r < n; ++r) {
        std::vector<double> v(n);
        double vv = 0;
        for (auto& x : v) {
            x = d(g);
            vv += x * x;
        }
        for (std::size_t j = 0; j < n; ++j) {  // column j of Q ← (I - 2vvᵀ/vᵀv)·column j
            double s = 0;
            for (std::size_t i = 0; i < n; ++i) s += v[i] * q[i + j * n];
            for (std::size_t i = 0; i < n; ++i) q[i + j * n] -= 2 * s / vv * v[i];
        }
    }
    std::vector<double> a(n * n, 0.0);
    for (std::size_t j = 0; j < n; ++j)
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t k = 0; k < n; ++k) a[i + j * n] += q[i + k * n] * lambda[k] * q[j + k * n];
    for (std::size_t j = 0; j < n; ++j)  // exactly symmetric
        for (std::size_t i = 0; i < j; ++i) a[j + i * n] = a[i + j * n];
    return a;
}

}  // namespace

TEST_CASE("small symmetric eigensolver: every variant on this CPU, against known spectra", "[linalg][kernels]") {
    INFO("small eigen kernels on this CPU: " << detail::available_small_eigen_kernel_count()
                                             << ", chosen: " << detail::small_eigen_kernels().name);
    CHECK(detail::available_small_eigen_kernel(0).name == "portable");
    std::mt19937 g(43);
    std::normal_distribution<double> d;
    std::uniform_real_distribution<double> u(-1, 1);
    // Spectra: random of both signs, clustered, repeated, rank-deficient (zeros), one dominant
    // value, tiny and huge scales (the solver scales by a power of two), and graded.
    auto spectra = [&](std::size_t n) {
        std::vector<std::vector<double>> s;
        std::vector<double> x(n);
        for (auto& v : x) v = d(g);
        s.push_back(x);
        for (std::size_t i = 0; i < n; ++i) x[i] = 1.0 + 1e-9 * u(g);
        s.push_back(x);
        for (std::size_t i = 0; i < n; ++i) x[i] = i % 3 == 0 ? 2.0 : (i % 3 == 1 ? -1.0 : 0.5);
        s.push_back(x);
        for (std::size_t i = 0; i < n; ++i) x[i] = i < n / 2 ? std::abs(d(g)) : 0.0;
        s.push_back(x);
        for (std::size_t i = 0; i < n; ++i) x[i] = i == 0 ? 1e6 : u(g);
        s.push_back(x);
        for (std::size_t i = 0; i < n; ++i) x[i] = 1e-200 * d(g);
        s.push_back(x);
        for (std::size_t i = 0; i < n; ++i) x[i] = 1e200 * d(g);
        s.push_back(x);
        for (std::size_t i = 0; i < n; ++i) x[i] = std::pow(0.5, static_cast<double>(i));
        s.push_back(x);
        return s;
    };
    for (const std::size_t n : {1u, 2u, 3u, 5u, 8u, 9u, 16u, 17u, 31u, 32u, 33u, 48u, 64u, 97u}) {
        for (const auto& lambda : spectra(n)) {
            const std::vector<double> a0 = with_spectrum(lambda, g);
            std::vector<double> expected = lambda;
            std::sort(expected.begin(), expected.end(), std::greater<>());
            double scale = 0, fro2 = 0;
            for (double x : lambda) scale = std::max(scale, std::abs(x));
            if (scale == 0) scale = 1;
            for (double x : a0) fro2 += (x / scale) * (x / scale);
            for (std::size_t v = 0; v < detail::available_small_eigen_kernel_count(); ++v) {
                const auto& kernels = detail::available_small_eigen_kernel(v);
                CAPTURE(kernels.name, n, lambda.front(), lambda.back());
                std::vector<double> scratch(detail::small_eigen_scratch(n), std::numeric_limits<double>::quiet_NaN());
                std::vector<double> a = a0, values(n), only(n);
                REQUIRE(kernels.eigen(a.data(), n, values.data(), true, scratch.data()));
                double worst_value = 0, residual = 0, orthogonality = 0;
                for (std::size_t i = 0; i < n; ++i) {
                    worst_value = std::max(worst_value, std::abs(values[i] - expected[i]) / scale);
                    if (i > 0) CHECK(values[i] <= values[i - 1]);
                }
                for (std::size_t j = 0; j < n; ++j)
                    for (std::size_t i = 0; i < n; ++i) {
                        double av = 0, qq = 0;
                        for (std::size_t k = 0; k < n; ++k) {
                            av += a0[i + k * n] * a[k + j * n];
                            qq += a[k + i * n] * a[k + j * n];
                        }
                        residual = std::max(residual, std::abs(av - values[j] * a[i + j * n]) / scale);
                        orthogonality = std::max(orthogonality, std::abs(qq - (i == j ? 1.0 : 0.0)));
                    }
                CHECK(worst_value < 1e-13);
                CHECK(residual < 1e-13);
                CHECK(orthogonality < 1e-13);
                // Values alone: the same numbers (the same QL sweeps, without the rotations).
                a = a0;
                REQUIRE(kernels.eigen(a.data(), n, only.data(), false, scratch.data()));
                for (std::size_t i = 0; i < n; ++i) CHECK(only[i] == values[i]);
                // Tridiagonal form: the same spectrum and Frobenius norm.
                a = a0;
                std::vector<double> diagonal(n), off(n > 0 ? n - 1 : 0);
                kernels.tridiagonalize(a.data(), n, diagonal.data(), off.data(), scratch.data());
                std::vector<double> t(n * n, 0.0);
                double t2 = 0;
                for (std::size_t i = 0; i < n; ++i) {
                    t[i + i * n] = diagonal[i];
                    t2 += (diagonal[i] / scale) * (diagonal[i] / scale);
                    if (i + 1 < n) {
                        t[i + 1 + i * n] = t[i + (i + 1) * n] = off[i];
                        t2 += 2 * (off[i] / scale) * (off[i] / scale);
                    }
                }
                CHECK(std::abs(std::sqrt(t2) - std::sqrt(fro2)) <= 1e-13 * std::sqrt(fro2));
                REQUIRE(kernels.eigen(t.data(), n, only.data(), false, scratch.data()));
                double worst_t = 0;
                for (std::size_t i = 0; i < n; ++i) worst_t = std::max(worst_t, std::abs(only[i] - expected[i]) / scale);
                CHECK(worst_t < 1e-13);
            }
        }
    }
}

TEST_CASE("small symmetric eigensolver: zero, diagonal and non-finite matrices", "[linalg][kernels]") {
    for (std::size_t v = 0; v < detail::available_small_eigen_kernel_count(); ++v) {
        const auto& kernels = detail::available_small_eigen_kernel(v);
        CAPTURE(kernels.name);
        const std::size_t n = 6;
        std::vector<double> scratch(detail::small_eigen_scratch(n)), values(n), a(n * n, 0.0);
        REQUIRE(kernels.eigen(a.data(), n, values.data(), true, scratch.data()));
        for (std::size_t i = 0; i < n; ++i) {
            CHECK(values[i] == 0.0);
            for (std::size_t j = 0; j < n; ++j) CHECK(a[i + j * n] == (i == j ? 1.0 : 0.0));
        }
        // A diagonal matrix: its entries, sorted, with unit vectors.
        const double diagonal[] = {3, -1, 7, 0, 7, 2};
        std::fill(a.begin(), a.end(), 0.0);
        for (std::size_t i = 0; i < n; ++i) a[i + i * n] = diagonal[i];
        REQUIRE(kernels.eigen(a.data(), n, values.data(), true, scratch.data()));
        CHECK(values == std::vector<double>{7, 7, 3, 2, 0, -1});
        for (std::size_t j = 0; j < n; ++j) {
            double norm = 0, largest = 0;
            for (std::size_t i = 0; i < n; ++i) {
                norm += a[i + j * n] * a[i + j * n];
                largest = std::max(largest, std::abs(a[i + j * n]));
            }
            CHECK(norm == Approx(1.0));
            if (j >= 2) CHECK(largest == 1.0);  // the simple values' vectors are unit vectors
        }
        for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
            std::fill(a.begin(), a.end(), 1.0);
            a[1 + 2 * n] = a[2 + 1 * n] = bad;
            CHECK_FALSE(kernels.eigen(a.data(), n, values.data(), true, scratch.data()));
        }
    }
}

TEST_CASE("parallel_for: BLAS single-threaded in the workers and with one worker asked for", "[linalg][parallel]") {
    // Regression: with -j 1 the loop ran on one thread but left OpenBLAS at all cores, whose
    // threads then spun in sched_yield beside it (lora-stack -j 1: 4 s of system time).
    const int before = linalg::blas_threads();
    linalg::set_blas_threads(2);
    NoProgress progress;
    for (const int threads : {1, 2, 0}) {
        CAPTURE(threads);
        std::atomic<int> wrong{0};
        detail::parallel_for(5, threads, progress, [&](std::size_t) -> std::uint64_t {
            if (linalg::blas_threads() != 1) ++wrong;
            return 0;
        });
        CHECK(wrong == 0);
        CHECK(linalg::blas_threads() == 2);  // restored
    }
    // One item: BLAS may use the threads asked for (here 2).
    int inside = 0;
    detail::parallel_for(1, 2, progress, [&](std::size_t) -> std::uint64_t {
        inside = linalg::blas_threads();
        return 0;
    });
    CHECK(inside == 2);
    linalg::set_blas_threads(before);
}

TEST_CASE("Gram kernels: every variant's matrix-vector product, dot and axpy", "[linalg][kernels]") {
    std::mt19937 g(47);
    std::normal_distribution<double> d;
    for (const std::size_t n : {1u, 2u, 7u, 8u, 9u, 15u, 16u, 17u, 100u, 160u, 191u, 192u, 193u, 250u}) {
        std::vector<double> m(n * n), x(n), y0(n);
        for (auto& v : m) v = d(g);
        for (auto& v : x) v = d(g);
        for (auto& v : y0) v = d(g);
        std::vector<double> reference(n, 0.0);
        double dot = 0, magnitude = 0;
        for (std::size_t i = 0; i < n; ++i) {
            dot += x[i] * y0[i];
            magnitude += std::abs(x[i] * y0[i]);
            for (std::size_t j = 0; j < n; ++j) reference[i] += m[i + j * n] * x[j];
        }
        for (std::size_t v = 0; v < detail::available_gram_kernel_count(); ++v) {
            const auto& kernels = detail::available_gram_kernel(v);
            CAPTURE(kernels.name, n);
            // One guard value past the end: nothing is written beyond n.
            std::vector<double> y(n + 1, 12345.0);
            kernels.matvec(m.data(), n, x.data(), y.data());
            for (std::size_t i = 0; i < n; ++i) {
                double scale = 0;
                for (std::size_t j = 0; j < n; ++j) scale += std::abs(m[i + j * n] * x[j]);
                CHECK(std::abs(y[i] - reference[i]) <= 1e-14 * scale);
            }
            CHECK(y[n] == 12345.0);
            CHECK(std::abs(kernels.dot(x.data(), y0.data(), n) - dot) <= 1e-14 * magnitude);
            std::vector<double> z = y0;
            z.push_back(12345.0);
            kernels.axpy(n, -0.75, x.data(), z.data());
            for (std::size_t i = 0; i < n; ++i) CHECK(std::abs(z[i] - (y0[i] - 0.75 * x[i])) <= 1e-15 * (std::abs(y0[i]) + std::abs(x[i])));
            CHECK(z[n] == 12345.0);
        }
    }
}

TEST_CASE("Gram kernels: every variant's f32 Grams of rows and of columns", "[linalg][kernels]") {
    std::mt19937 g(53);
    std::normal_distribution<float> d;
    for (const std::size_t R : {1u, 5u, 15u, 16u, 17u, 40u, 48u, 49u, 160u, 161u})
        for (const std::size_t n : {1u, 3u, 16u, 17u, 64u, 100u}) {
            // An R x n row-major block (with a wider row stride); its columns are the Gram's rows.
            const std::size_t src_ld = n + 5;
            std::vector<float> block(R * src_ld, std::numeric_limits<float>::quiet_NaN());
            for (std::size_t k = 0; k < R; ++k)
                for (std::size_t j = 0; j < n; ++j) block[k * src_ld + j] = d(g);
            std::vector<double> reference(R * R, 0.0), magnitude(R * R, 0.0);
            for (std::size_t i = 0; i < R; ++i)
                for (std::size_t j = i; j < R; ++j)
                    for (std::size_t c = 0; c < n; ++c) {
                        const double p = double(block[i * src_ld + c]) * block[j * src_ld + c];
                        reference[i + j * R] += 2 * p;  // two chunks below
                        magnitude[i + j * R] += 2 * std::abs(p);
                    }
            for (std::size_t v = 0; v < detail::available_gram_kernel_count(); ++v) {
                const auto& kernels = detail::available_gram_kernel(v);
                CAPTURE(kernels.name, R, n);
                const std::size_t ld = kernels.stride_f32(R);
                REQUIRE(ld >= R);
                REQUIRE(kernels.chunk_f32(ld) >= 16);
                const std::size_t chunk = std::max(kernels.chunk_f32(ld), n);
                std::vector<float> rows(chunk * ld, 0.0f), scratch(ld * ld);
                // The columns directly, and (the same values) as rows: both give the Gram.
                std::vector<double> by_columns(ld * ld, 0.0), by_rows(ld * ld, 0.0);
                kernels.accumulate_columns_f32(block.data(), src_ld, R, n, ld, by_columns.data(), rows.data(), scratch.data());
                kernels.accumulate_columns_f32(block.data(), src_ld, R, n, ld, by_columns.data(), rows.data(), scratch.data());
                std::fill(rows.begin(), rows.end(), 0.0f);
                for (std::size_t j = 0; j < n; ++j)
                    for (std::size_t k = 0; k < R; ++k) rows[j * ld + k] = block[k * src_ld + j];
                kernels.accumulate_rows_f32(rows.data(), n, R, ld, by_rows.data(), scratch.data());
                kernels.accumulate_rows_f32(rows.data(), n, R, ld, by_rows.data(), scratch.data());
                double worst = 0;
                for (std::size_t j = 0; j < R; ++j)
                    for (std::size_t i = 0; i <= j; ++i) {
                        const double scale = magnitude[i + j * R];
                        worst = std::max({worst, std::abs(by_columns[i + j * ld] - reference[i + j * R]) / scale,
                                          std::abs(by_rows[i + j * ld] - reference[i + j * R]) / scale});
                    }
                CHECK(worst < 1e-6);  // f32 sums of n products per chunk
            }
        }
}

TEST_CASE("small symmetric eigensolver: a block at 1e-200 beside one at 1", "[linalg][kernels]") {
    // The trailing block's reflectors have norms near 1e-200 after the global scaling: a reflector
    // factor formed as 1/(‖x‖·|v₀|) overflowed there (regression).
    std::mt19937 g(59);
    const std::vector<double> big = {3.0, 1.5, 1.0, 0.5, 0.25}, tiny = {4e-200, 3e-200, 2e-200, 1e-200, 5e-201};
    const std::vector<double> a_big = with_spectrum(big, g), a_tiny = with_spectrum(tiny, g);
    const std::size_t n = 10;
    std::vector<double> a0(n * n, 0.0);
    for (std::size_t j = 0; j < 5; ++j)
        for (std::size_t i = 0; i < 5; ++i) {
            a0[i + j * n] = a_big[i + j * 5];
            a0[5 + i + (5 + j) * n] = a_tiny[i + j * 5];
        }
    for (std::size_t v = 0; v < detail::available_small_eigen_kernel_count(); ++v) {
        const auto& kernels = detail::available_small_eigen_kernel(v);
        CAPTURE(kernels.name);
        std::vector<double> a = a0, values(n), scratch(detail::small_eigen_scratch(n));
        REQUIRE(kernels.eigen(a.data(), n, values.data(), true, scratch.data()));
        for (std::size_t i = 0; i < 5; ++i) CHECK(std::abs(values[i] - big[i]) < 1e-13);
        for (std::size_t i = 5; i < n; ++i) CHECK(std::abs(values[i] - tiny[i - 5]) < 1e-13 * 4e-200);
        for (double x : a) CHECK(std::isfinite(x));
        std::vector<double> diagonal(n), off(n - 1);
        kernels.tridiagonalize(a0.data(), n, diagonal.data(), off.data(), scratch.data());
        for (double x : diagonal) CHECK(std::isfinite(x));
        for (double x : off) CHECK(std::isfinite(x));
    }
}

TEST_CASE("Gram kernels: every variant's MᵀM z and max |x| over stored f32, f16 and bf16 values", "[linalg][kernels]") {
    std::mt19937 g(53);
    std::normal_distribution<float> d;
    const std::pair<std::int64_t, std::int64_t> shapes[] = {{1, 1},   {3, 17},    {5, 16},   {7, 64},  {9, 81},
                                                            {130, 15}, {300, 1100}, {1030, 40}, {4, 2000}};
    for (const auto& shape : shapes)
        for (const DType type : {DType::F32, DType::F16, DType::BF16}) {
            const std::int64_t rows = shape.first, cols = shape.second;  // (lambdas below capture them)
            const auto count = static_cast<std::size_t>(rows * cols);
            std::vector<float> values(count);
            for (auto& x : values) x = d(g);
            const Tensor stored = Tensor::from_f32(type, {rows, cols}, values);
            const std::vector<float> exact = stored.to_f32();  // the values the kernels see
            // One byte past an aligned address: the kernels read stored values where they are.
            std::vector<std::byte> buffer(stored.bytes().size() + 64);
            std::byte* m = buffer.data() + 1;
            std::memcpy(m, stored.bytes().data(), stored.bytes().size());
            const auto at = [&](std::int64_t r, std::int64_t c) { return static_cast<double>(exact[static_cast<std::size_t>(r * cols + c)]); };
            for (std::size_t l = 1; l <= 5; ++l) {
                std::vector<float> z(static_cast<std::size_t>(cols) * l);
                for (auto& x : z) x = d(g);
                // Reference in double, and the sums of magnitudes that bound f32 rounding.
                std::vector<double> reference(static_cast<std::size_t>(cols) * l, 0.0), magnitude(reference.size(), 0.0);
                for (std::size_t k = 0; k < l; ++k)
                    for (std::int64_t r = 0; r < rows; ++r) {
                        double t = 0, t_abs = 0;
                        for (std::int64_t c = 0; c < cols; ++c) {
                            t += at(r, c) * z[k * static_cast<std::size_t>(cols) + static_cast<std::size_t>(c)];
                            t_abs += std::abs(at(r, c) * z[k * static_cast<std::size_t>(cols) + static_cast<std::size_t>(c)]);
                        }
                        for (std::int64_t c = 0; c < cols; ++c) {
                            reference[k * static_cast<std::size_t>(cols) + static_cast<std::size_t>(c)] += at(r, c) * t;
                            magnitude[k * static_cast<std::size_t>(cols) + static_cast<std::size_t>(c)] += std::abs(at(r, c)) * t_abs;
                        }
                    }
                for (std::size_t v = 0; v < detail::available_gram_kernel_count(); ++v) {
                    const auto& kernels = detail::available_gram_kernel(v);
                    CAPTURE(kernels.name, rows, cols, dtype_name(type), l);
                    std::vector<float> out(reference.size() + 1, 12345.0f),
                        scratch(kernels.normal_scratch(static_cast<std::size_t>(cols), l));
                    kernels.normal_apply(m, type, static_cast<std::size_t>(rows), static_cast<std::size_t>(cols), z.data(), l,
                                         out.data(), scratch.data());
                    std::size_t bad = 0;
                    for (std::size_t i = 0; i < reference.size(); ++i)
                        bad += std::abs(out[i] - reference[i]) <= 1e-4 * magnitude[i] + 1e-30 ? 0 : 1;
                    CHECK(bad == 0);
                    CHECK(out.back() == 12345.0f);  // nothing written past the block
                }
            }
            // max |x|, with the largest magnitude planted anywhere (the tail included), negative.
            for (int trial = 0; trial < 3; ++trial) {
                std::vector<float> planted = values;
                const std::size_t where = trial == 0 ? count - 1 : static_cast<std::size_t>(g() % count);
                planted[where] = -7.5f;
                const Tensor t = Tensor::from_f32(type, {rows, cols}, planted);
                std::memcpy(m, t.bytes().data(), t.bytes().size());
                for (std::size_t v = 0; v < detail::available_gram_kernel_count(); ++v) {
                    const auto& kernels = detail::available_gram_kernel(v);
                    CAPTURE(kernels.name, rows, cols, dtype_name(type), where);
                    CHECK(kernels.max_abs(m, type, count) == 7.5f);
                    CHECK(kernels.max_abs(m, type, 0) == 0.0f);
                }
                for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                                        -std::numeric_limits<float>::infinity()}) {
                    planted[where] = bad;
                    const Tensor u = Tensor::from_f32(type, {rows, cols}, planted);
                    std::memcpy(m, u.bytes().data(), u.bytes().size());
                    for (std::size_t v = 0; v < detail::available_gram_kernel_count(); ++v) {
                        const auto& kernels = detail::available_gram_kernel(v);
                        CAPTURE(kernels.name, rows, cols, dtype_name(type), where, bad);
                        CHECK(std::isinf(kernels.max_abs(m, type, count)));
                    }
                }
            }
        }
}

TEST_CASE("spectral_norm reads f16 and bf16 values in place, as their f32 widening", "[linalg]") {
    std::mt19937 g(31);
    std::normal_distribution<float> d;
    for (const DType type : {DType::F16, DType::BF16})
        for (const auto& [rows, cols] : {std::pair<std::int64_t, std::int64_t>{200, 120}, {64, 300}, {33, 17}}) {
            std::vector<float> values(static_cast<std::size_t>(rows * cols));
            for (auto& x : values) x = d(g);
            const Tensor stored = Tensor::from_f32(type, {rows, cols}, values);
            const std::vector<float> widened = stored.to_f32();
            std::vector<std::byte> unaligned(stored.bytes().size() + 1);
            std::memcpy(unaligned.data() + 1, stored.bytes().data(), stored.bytes().size());
            const double expected = spectral_norm(widened.data(), rows, cols);
            CAPTURE(dtype_name(type), rows, cols);
            CHECK(spectral_norm(DenseView{stored.bytes().data(), type, rows, cols}) == Approx(expected).epsilon(1e-6));
            CHECK(spectral_norm(DenseView{unaligned.data() + 1, type, rows, cols}) == Approx(expected).epsilon(1e-6));
            CHECK(spectral_norm(DenseView{stored.bytes().data(), type, rows, cols}) <=
                  dense_singular_values(widened.data(), rows, cols).front() * (1 + 1e-6));
        }
    const std::vector<std::int8_t> bytes(12, 1);
    CHECK_THROWS_AS(spectral_norm(DenseView{bytes.data(), DType::I8, 3, 4}), Error);
    // Non-finite f16 values are refused as the f32 ones are.
    std::vector<float> bad(12, 1.0f);
    bad[7] = std::numeric_limits<float>::infinity();
    const Tensor t = Tensor::from_f32(DType::F16, {3, 4}, bad);
    CHECK_THROWS_AS(spectral_norm(DenseView{t.bytes().data(), DType::F16, 3, 4}), Error);
}
