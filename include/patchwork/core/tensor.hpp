#pragma once
// Tensor<T, Device>: an owning, contiguous, row-major array of at most four
// dimensions. On the CPU it offers an Eigen view (`matrix()`: rows are the
// product of the leading dimensions, columns the last one) and, through
// patchwork/core/xtensor.hpp, an xtensor view over the same memory.
//
// `resize` keeps the allocation when the new shape fits, so modules that own
// their output buffers allocate once and then reuse them every step.
#include <algorithm>
#include <cstddef>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "patchwork/core/error.hpp"
#include "patchwork/core/shape.hpp"

namespace patchwork {

/// Device tags. Tensor<T, Cuda> is defined by the CUDA backend
/// (patchwork/cuda/device_tensor.hpp); modules whose Device is Cuda run their
/// forward and backward on the GPU.
struct Cpu {};
struct Cuda {};

/// bfloat16: 16-bit storage (8 exponent bits, 7 mantissa bits), converted from
/// float with round-to-nearest-even. Device modules may store their parameters
/// and activations in it (`BasicLinear<bf16, Cuda>`): the kernels load bf16,
/// compute in fp32 and round once when they store, and the optimisers keep an
/// fp32 master copy of every bf16 parameter (train/optimizer.hpp). On the host
/// it is Eigen's bfloat16 (arithmetic through float), so host tensors of it
/// exist for staging and inspection; CPU modules compute in float or double.
using bf16 = Eigen::bfloat16;

/// The element types a tensor may hold: float, double, and bf16.
template <class T>
inline constexpr bool is_tensor_scalar_v = std::is_floating_point_v<T> || std::is_same_v<T, bf16>;

/// The type a host computes a value of T in: float for bf16, T otherwise.
template <class T>
using compute_t = std::conditional_t<std::is_same_v<T, bf16>, float, T>;

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixMap = Eigen::Map<RowMatrix<T>, Eigen::Aligned16>;
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>, Eigen::Aligned16>;
template <class T>
using VectorMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>, Eigen::Aligned16>;
template <class T>
using ConstVectorMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>, Eigen::Aligned16>;

template <class T, class Device = Cpu>
class Tensor;

template <class T>
class Tensor<T, Cpu> {
    static_assert(is_tensor_scalar_v<T>, "patchwork::Tensor holds float, double or bf16");

public:
    using Scalar = T;
    using Device = Cpu;

    Tensor() = default;
    /// A zero-filled tensor of the given shape.
    explicit Tensor(const Shape& shape) : data_(shape.numel(), T(0)), shape_(shape) {}
    Tensor(const Shape& shape, T fill) : data_(shape.numel(), fill), shape_(shape) {}
    /// A tensor with the given shape and values (row-major); sizes must agree.
    Tensor(const Shape& shape, std::initializer_list<T> values) : data_(values), shape_(shape) {
        if (values.size() != shape.numel())
            throw ShapeError(detail::concat("Tensor: ", values.size(), " values given for shape ", shape));
    }

    [[nodiscard]] const Shape& shape() const noexcept { return shape_; }
    [[nodiscard]] std::size_t rank() const noexcept { return shape_.rank(); }
    [[nodiscard]] std::size_t dim(std::size_t i) const noexcept { return shape_[i]; }
    [[nodiscard]] std::size_t size() const noexcept { return data_.size(); }
    [[nodiscard]] bool empty() const noexcept { return data_.empty(); }
    [[nodiscard]] std::size_t rows() const noexcept { return shape_.rows(); }
    [[nodiscard]] std::size_t cols() const noexcept { return shape_.back(); }

    [[nodiscard]] T* data() noexcept { return data_.data(); }
    [[nodiscard]] const T* data() const noexcept { return data_.data(); }
    [[nodiscard]] T* begin() noexcept { return data_.data(); }
    [[nodiscard]] T* end() noexcept { return data_.data() + data_.size(); }
    [[nodiscard]] const T* begin() const noexcept { return data_.data(); }
    [[nodiscard]] const T* end() const noexcept { return data_.data() + data_.size(); }

    T& operator[](std::size_t i) noexcept { return data_[i]; }
    const T& operator[](std::size_t i) const noexcept { return data_[i]; }
    /// Element (r, c) of the matrix view.
    T& operator()(std::size_t r, std::size_t c) noexcept { return data_[r * cols() + c]; }
    const T& operator()(std::size_t r, std::size_t c) const noexcept { return data_[r * cols() + c]; }

    /// Change the shape; keeps the allocation when it is large enough.
    /// Contents are unspecified afterwards unless the element count is unchanged.
    void resize(const Shape& shape) {
        data_.resize(shape.numel());
        shape_ = shape;
    }
    /// Reinterpret the same elements under another shape of equal size.
    void reshape(const Shape& shape) {
        if (shape.numel() != data_.size())
            throw ShapeError(detail::concat("Tensor::reshape: cannot view ", shape_, " as ", shape));
        shape_ = shape;
    }
    void fill(T v) noexcept { std::fill(data_.begin(), data_.end(), v); }
    void zero() noexcept { fill(T(0)); }
    /// No elements (empty() is true), keeping the allocation for the next resize.
    void clear() noexcept {
        data_.clear();
        shape_ = Shape{};
    }
    /// Release the memory (a frozen parameter's gradient, a freed candidate).
    void release() noexcept {
        std::vector<T, Eigen::aligned_allocator<T>>().swap(data_);
        shape_ = Shape{};
    }

    /// Eigen view: rows = product of leading dimensions, cols = last dimension.
    [[nodiscard]] MatrixMap<T> matrix() noexcept {
        return MatrixMap<T>(data(), Eigen::Index(rows()), Eigen::Index(cols()));
    }
    [[nodiscard]] ConstMatrixMap<T> matrix() const noexcept {
        return ConstMatrixMap<T>(data(), Eigen::Index(rows()), Eigen::Index(cols()));
    }
    /// Eigen view of all elements as one column vector.
    [[nodiscard]] VectorMap<T> vector() noexcept { return VectorMap<T>(data(), Eigen::Index(size())); }
    [[nodiscard]] ConstVectorMap<T> vector() const noexcept {
        return ConstVectorMap<T>(data(), Eigen::Index(size()));
    }

private:
    std::vector<T, Eigen::aligned_allocator<T>> data_;
    Shape shape_;
};

/// A host tensor converted element by element to another element type (through
/// float for bf16: bf16 -> float is exact; float or double -> bf16 rounds to nearest even).
template <class To, class From>
[[nodiscard]] Tensor<To> cast(const Tensor<From>& x) {
    Tensor<To> y(x.shape());
    const From* src = x.data();
    To* dst = y.data();
    for (std::size_t i = 0; i < x.size(); ++i) {
        if constexpr (std::is_same_v<To, From>) dst[i] = src[i];
        else if constexpr (std::is_same_v<To, bf16>) dst[i] = bf16(static_cast<float>(src[i]));
        else dst[i] = static_cast<To>(static_cast<compute_t<From>>(src[i]));
    }
    return y;
}

/// Throw a ShapeError naming the module path, what was checked and both shapes.
[[noreturn]] inline void throw_shape_error(const std::string& path, const std::string& what, const Shape& expected,
                                           const Shape& got) {
    throw ShapeError(detail::concat(detail::display_path(path), ": ", what, ": expected ", expected, ", got ", got));
}

/// Check that `t` is at least a matrix whose last dimension is `cols`.
template <class T, class D>
void check_cols(const Tensor<T, D>& t, std::size_t cols, const std::string& path, const char* what) {
    if (t.rank() < 1 || t.cols() != cols || t.empty())
        throw_shape_error(path, what, t.rank() ? t.shape().with_back(cols) : Shape{0, cols}, t.shape());
}

/// Check that two tensors have equal shapes.
template <class T, class D>
void check_same_shape(const Tensor<T, D>& a, const Shape& expected, const std::string& path, const char* what) {
    if (!(a.shape() == expected)) throw_shape_error(path, what, expected, a.shape());
}

}  // namespace patchwork
