#include "lorakit/lycoris.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "lorakit/error.h"

extern "C" {
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
}

namespace lorakit {

namespace {

constexpr int row_major = 101, no_trans = 111;

const Tensor* find_role(const LycorisModule& m, std::string_view role) {
    for (const auto& t : m.tensors)
        if (t.name == role) return &t.tensor;
    return nullptr;
}

const Tensor& need(const LycorisModule& m, std::string_view role) {
    const Tensor* t = find_role(m, role);
    if (!t) fail(ErrorCode::bad_input, "{} module lacks {}", m.algorithm, role);
    return *t;
}

struct Matrix {
    std::int64_t rows = 0, cols = 0;
    std::vector<float> v;
};

// A tensor as a matrix: the first dimension by the product of the rest.
Matrix as_matrix(const Tensor& t) {
    Matrix m;
    m.rows = t.ndim() == 0 ? 1 : t.dim(0);
    m.cols = m.rows ? t.element_count() / m.rows : 0;
    m.v = t.to_f32();
    return m;
}

Matrix product(const Matrix& a, const Matrix& b, std::string_view what) {
    if (a.cols != b.rows) fail(ErrorCode::bad_input, "{}: inner sizes {} and {} differ", what, a.cols, b.rows);
    Matrix c{a.rows, b.cols, std::vector<float>(static_cast<std::size_t>(a.rows * b.cols))};
    if (a.rows && b.cols && a.cols)
        cblas_sgemm(row_major, no_trans, no_trans, static_cast<int>(a.rows), static_cast<int>(b.cols),
                    static_cast<int>(a.cols), 1.0f, a.v.data(), static_cast<int>(a.cols), b.v.data(),
                    static_cast<int>(b.cols), 0.0f, c.v.data(), static_cast<int>(c.cols));
    return c;
}

Matrix transposed(const Matrix& a) {
    Matrix t{a.cols, a.rows, std::vector<float>(a.v.size())};
    for (std::int64_t i = 0; i < a.rows; ++i)
        for (std::int64_t j = 0; j < a.cols; ++j) t.v[static_cast<std::size_t>(j * a.rows + i)] = a.v[static_cast<std::size_t>(i * a.cols + j)];
    return t;
}

// einsum('i j k l, j r, i p -> p r k l', t, wb, wa): the Tucker rebuild of LyCORIS, with
// t [R, R, kh, kw], wb [R, in], wa [R, out] -> [out, in, kh, kw] (flattened row-major).
Matrix rebuild_tucker(const Tensor& t, const Matrix& wb, const Matrix& wa, Shape& shape, std::string_view what) {
    if (t.ndim() != 4) fail(ErrorCode::bad_input, "{}: the Tucker core must be 4-D", what);
    const std::int64_t r1 = t.dim(0), r2 = t.dim(1), kh = t.dim(2), kw = t.dim(3);
    if (wa.rows != r1 || wb.rows != r2) fail(ErrorCode::bad_input, "{}: Tucker factor ranks disagree with the core", what);
    const std::int64_t out = wa.cols, in = wb.cols, kk = kh * kw;
    const auto core = t.to_f32();
    // X[i, r, k] = Σ_j t[i, j, k] wb[j, r]; then M[p, r, k] = Σ_i wa[i, p] X[i, r, k].
    std::vector<float> x(static_cast<std::size_t>(r1 * in * kk), 0.0f);
    for (std::int64_t i = 0; i < r1; ++i)
        for (std::int64_t j = 0; j < r2; ++j)
            for (std::int64_t r = 0; r < in; ++r) {
                const float b = wb.v[static_cast<std::size_t>(j * in + r)];
                for (std::int64_t k = 0; k < kk; ++k)
                    x[static_cast<std::size_t>((i * in + r) * kk + k)] += core[static_cast<std::size_t>((i * r2 + j) * kk + k)] * b;
            }
    Matrix xm{r1, in * kk, std::move(x)};
    Matrix m = product(transposed(wa), xm, what);  // [out, in·kk]
    shape = kk == 1 ? Shape{out, in} : Shape{out, in, kh, kw};
    if (kk == 1 && t.ndim() == 4) shape = Shape{out, in, 1, 1};
    return m;
}

// W1 ⊗ W2 with W1 [a, c] and W2 [b, d·K] -> [a·b, c·d·K].
Matrix kron(const Matrix& w1, const Matrix& w2, std::int64_t kernel) {
    const std::int64_t a = w1.rows, c = w1.cols, b = w2.rows, dk = w2.cols;
    Matrix out{a * b, c * dk, std::vector<float>(static_cast<std::size_t>(a * b * c * dk))};
    (void)kernel;
    for (std::int64_t i = 0; i < a; ++i)
        for (std::int64_t j = 0; j < b; ++j)
            for (std::int64_t k = 0; k < c; ++k) {
                const float s = w1.v[static_cast<std::size_t>(i * c + k)];
                float* row = out.v.data() + static_cast<std::size_t>((i * b + j) * (c * dk) + k * dk);
                const float* src = w2.v.data() + static_cast<std::size_t>(j * dk);
                for (std::int64_t l = 0; l < dk; ++l) row[l] = s * src[l];
            }
    return out;
}

// LyCORIS stores the LoHa factors, and LoKr's low-rank w2, of a convolution without Tucker
// flattened ([r, in·kh·kw]), so the file does not give the kernel. The 3x3 convolutions of Stable
// Diffusion UNets are known by name (diffusers and original/SGM paths, dotted or kohya-flattened).
bool is_sd_unet_3x3_conv(std::string_view name) {
    std::string n(name);
    std::replace(n.begin(), n.end(), '_', '.');
    if (n.find("unet") == std::string::npos) return false;
    auto ends = [&](std::string_view tail) { return n.ends_with(tail); };
    auto has = [&](std::string_view part) { return n.find(part) != std::string::npos; };
    return (has("resnets.") && (ends(".conv1") || ends(".conv2"))) || ends("downsamplers.0.conv") ||
           ends("upsamplers.0.conv") || ends("unet.conv.in") || ends("unet.conv.out") || ends(".in.layers.2") ||
           ends(".out.layers.3") || (has("input.blocks.") && ends(".0.op")) || (has("output.blocks.") && ends(".conv")) ||
           ends("input.blocks.0.0") || ends("unet.out.2");
}

// The kernel of a flattened convolution delta with `cols` columns: 3x3 for a known one.
Shape flattened_kernel(const LycorisModule& m, std::int64_t cols) {
    if (cols % 9 == 0 && (is_sd_unet_3x3_conv(m.name) || is_sd_unet_3x3_conv(m.source_name))) return {3, 3};
    return {1, 1};
}

}  // namespace

std::int64_t LycorisDelta::cols() const {
    std::int64_t n = 1;
    for (std::size_t i = 1; i < weight_shape.size(); ++i) n *= weight_shape[i];
    return n;
}

LycorisDelta lycoris_delta(const LycorisModule& m) {
    return with_context(fmt::format("module {}", quote(m.name)), [&] {
        if (m.dora_scale) fail(ErrorCode::unsupported, "a {} module with DoRA (dora_scale) has no plain LoRA form", m.algorithm);
        LycorisDelta d;
        Matrix delta;
        double scale = 1.0;
        auto alpha_over = [&](std::int64_t r) { return m.alpha ? *m.alpha / static_cast<double>(r) : 1.0; };
        if (m.algorithm == "loha") {
            const Tensor *t1 = find_role(m, "hada_t1"), *t2 = find_role(m, "hada_t2");
            const Matrix w1a = as_matrix(need(m, "hada_w1_a")), w1b = as_matrix(need(m, "hada_w1_b"));
            const Matrix w2a = as_matrix(need(m, "hada_w2_a")), w2b = as_matrix(need(m, "hada_w2_b"));
            Matrix m1, m2;
            Shape s1, s2;
            if (t1 && t2) {
                m1 = rebuild_tucker(*t1, w1b, w1a, s1, "LoHa");
                m2 = rebuild_tucker(*t2, w2b, w2a, s2, "LoHa");
            } else {
                m1 = product(w1a, w1b, "LoHa w1");
                m2 = product(w2a, w2b, "LoHa w2");
                const Shape k = flattened_kernel(m, m1.cols);
                s1 = s2 = k[0] * k[1] == 1 ? Shape{m1.rows, m1.cols} : Shape{m1.rows, m1.cols / 9, 3, 3};
            }
            if (m1.rows != m2.rows || m1.cols != m2.cols || s1 != s2)
                fail(ErrorCode::bad_input, "LoHa products have different shapes");
            for (std::size_t i = 0; i < m1.v.size(); ++i) m1.v[i] *= m2.v[i];
            delta = std::move(m1);
            d.weight_shape = s1;
            scale = alpha_over(w1b.rows);
        } else if (m.algorithm == "lokr") {
            const Tensor *w1 = find_role(m, "lokr_w1"), *w1a = find_role(m, "lokr_w1_a"), *w1b = find_role(m, "lokr_w1_b");
            const Tensor *w2 = find_role(m, "lokr_w2"), *w2a = find_role(m, "lokr_w2_a"), *w2b = find_role(m, "lokr_w2_b");
            const Tensor* t2 = find_role(m, "lokr_t2");
            const Matrix W1 = w1 ? as_matrix(*w1) : product(as_matrix(need(m, "lokr_w1_a")), as_matrix(need(m, "lokr_w1_b")), "LoKr w1");
            Matrix W2;
            Shape kernel{1, 1};
            bool conv = false;
            if (w2) {
                W2 = as_matrix(*w2);
                if (w2->ndim() == 4) {
                    kernel = {w2->dim(2), w2->dim(3)};
                    conv = true;
                }
            } else if (t2) {
                Shape s;
                W2 = rebuild_tucker(*t2, as_matrix(need(m, "lokr_w2_b")), as_matrix(need(m, "lokr_w2_a")), s, "LoKr");
                if (s.size() == 4) {
                    kernel = {s[2], s[3]};
                    conv = true;
                }
            } else {
                W2 = product(as_matrix(need(m, "lokr_w2_a")), as_matrix(need(m, "lokr_w2_b")), "LoKr w2");
                kernel = flattened_kernel(m, W2.cols);
                conv = kernel[0] * kernel[1] > 1;
            }
            delta = kron(W1, W2, kernel[0] * kernel[1]);
            const std::int64_t kk = kernel[0] * kernel[1];
            d.weight_shape = conv ? Shape{delta.rows, delta.cols / kk, kernel[0], kernel[1]} : Shape{delta.rows, delta.cols};
            // s = alpha / r of whichever factor is low-rank; both full: 1 (alpha ignored).
            if (w1b) scale = alpha_over(w1b->dim(0));
            else if (w2b) scale = alpha_over(w2b->dim(0));
            else scale = 1.0;
            (void)w1a;
            (void)w2a;
        } else if (m.algorithm == "full") {
            const Tensor* diff = find_role(m, "diff");
            if (!diff) fail(ErrorCode::unsupported, "a full module with only diff_b (a bias) has no LoRA form");
            delta = as_matrix(*diff);
            d.weight_shape = diff->shape();
            if (const Tensor* b = find_role(m, "diff_b")) d.bias = *b;
        } else if (m.algorithm == "locon-tucker") {
            const Tensor& down = need(m, "lora_down");
            const Tensor& up = need(m, "lora_up");
            const Tensor& mid = need(m, "lora_mid");
            // wa = up.view(out, r).T, wb = down.view(r, in).
            const Matrix up_m = as_matrix(up), down_m = as_matrix(down);
            delta = rebuild_tucker(mid, down_m, transposed(up_m), d.weight_shape, "LoCon Tucker");
            scale = alpha_over(down.dim(0));
        } else {
            fail(ErrorCode::unsupported, "a {} module has no LoRA form (its delta {})", m.algorithm,
                 m.algorithm == "norm" ? "is a norm layer's weight" : "depends on the base weight");
        }
        if (delta.rows != d.weight_shape.at(0) || static_cast<std::int64_t>(delta.v.size()) != d.rows() * d.cols())
            fail(ErrorCode::bad_input, "the rebuilt delta does not match its weight shape");
        if (scale != 1.0)
            for (auto& x : delta.v) x = static_cast<float>(x * scale);
        for (float x : delta.v)
            if (!std::isfinite(x)) fail(ErrorCode::bad_input, "the delta holds NaN or infinite values");
        d.values = std::move(delta.v);
        return d;
    });
}

LycorisConversion lycoris_to_lora(const LycorisModule& module, std::int64_t rank, DType dtype,
                                  const linalg::DenseSvdOptions& options) {
    const LycorisDelta d = lycoris_delta(module);
    return with_context(fmt::format("module {}", quote(module.name)), [&] {
        const std::int64_t out = d.rows(), in = d.cols();
        const std::int64_t k = std::max<std::int64_t>(1, std::min({rank, out, in}));
        const linalg::DenseSvd svd = linalg::truncated_svd(d.values.data(), out, in, k, options);
        std::vector<float> up, down;
        linalg::split_factors(svd.u, svd.singular_values, svd.v, out, in, svd.kept, k, false, up, down);
        // The error measured on the result: ||ΔW - B·A|| / ||ΔW||.
        std::vector<float> residual = d.values;
        cblas_sgemm(row_major, no_trans, no_trans, static_cast<int>(out), static_cast<int>(in), static_cast<int>(k), -1.0f,
                    up.data(), static_cast<int>(k), down.data(), static_cast<int>(in), 1.0f, residual.data(),
                    static_cast<int>(in));
        double num = 0, den = 0;
        for (std::size_t i = 0; i < residual.size(); ++i) {
            num += static_cast<double>(residual[i]) * residual[i];
            den += static_cast<double>(d.values[i]) * d.values[i];
        }
        LycorisConversion c;
        c.relative_error = den > 0 ? std::sqrt(num / den) : 0.0;
        c.randomized = svd.randomized;
        LoraModule& m = c.module;
        m.name = module.name;
        m.source_name = module.source_name;
        const bool conv = d.weight_shape.size() == 4;
        m.kind = conv ? ModuleKind::conv : ModuleKind::linear;
        Shape down_shape{k, in}, up_shape{out, k};
        if (conv) {
            down_shape = {k, d.weight_shape[1], d.weight_shape[2], d.weight_shape[3]};
            up_shape = {out, k, 1, 1};
        }
        m.down = Tensor::from_f32(dtype, down_shape, down);
        m.up = Tensor::from_f32(dtype, up_shape, up);
        m.alpha = static_cast<double>(k);
        m.alpha_dtype = DType::F32;
        m.scale_rule = ScaleRule::alpha_over_rank;
        if (d.bias) m.bias = d.bias->converted(dtype);
        return c;
    });
}

}  // namespace lorakit
