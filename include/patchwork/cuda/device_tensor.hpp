#pragma once
// Device memory for the CUDA backend.
//
// cuda::Buffer<E>: an owning array of E (float, double, __nv_bfloat16, int) in
// device memory, the storage of every device tensor and of the kernels' scratch.
//
// Tensor<T, Cuda>: the device counterpart of Tensor<T, Cpu>: contiguous,
// row-major, at most four dimensions, with the same shape interface
// (shape, rows, cols, resize keeping the allocation, reshape, zero, clear,
// release). Its elements live on the device: there is no operator[]; move
// data with to_device / to_host / copy. Copies and fills are queued on the
// current context's stream (cuda::context()); to_host waits for the stream.
#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include <cuda_runtime_api.h>

#include "patchwork/core/tensor.hpp"
#include "patchwork/cuda/context.hpp"
#include "patchwork/cuda/cuda_error.hpp"

namespace patchwork {
namespace cuda {

template <class E>
class Buffer {
public:
    Buffer() = default;
    explicit Buffer(std::size_t n) { allocate(n); }
    ~Buffer() { free(); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    Buffer(Buffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    Buffer& operator=(Buffer&& o) noexcept {
        if (this != &o) {
            free();
            ptr_ = std::exchange(o.ptr_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }

    [[nodiscard]] E* data() noexcept { return ptr_; }
    [[nodiscard]] const E* data() const noexcept { return ptr_; }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }

    /// Make room for n elements; keeps the allocation (not its contents) when it is large enough.
    void reserve(std::size_t n) {
        if (n <= size_) return;
        free();
        allocate(n);
    }

    /// Host -> device (queued; `host` must stay alive until the stream reaches the copy, or call synchronize).
    void upload(std::span<const E> host, std::string_view where = "cuda::Buffer::upload") {
        reserve(host.size());
        check(cudaMemcpyAsync(ptr_, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, context().stream()),
              "cudaMemcpyAsync(host to device)", where);
    }
    /// Device -> host, waits for the stream.
    [[nodiscard]] std::vector<E> download(std::size_t n, std::string_view where = "cuda::Buffer::download") const {
        std::vector<E> out(n);
        if (n > size_)
            throw Error(patchwork::detail::concat(where, ": cannot read ", n, " elements from a buffer of ", size_));
        check(cudaMemcpyAsync(out.data(), ptr_, n * sizeof(E), cudaMemcpyDeviceToHost, context().stream()),
              "cudaMemcpyAsync(device to host)", where);
        context().synchronize(where);
        return out;
    }
    /// Set every byte of the first n elements to `byte` (0 for zeros; 0xFF poisons floats with NaN).
    void memset(int byte, std::size_t n, std::string_view where = "cuda::Buffer::memset") {
        if (n == 0) return;
        check(cudaMemsetAsync(ptr_, byte, n * sizeof(E), context().stream()), "cudaMemsetAsync", where);
    }

private:
    void allocate(std::size_t n) {
        if (n == 0) return;
        check(cudaMalloc(reinterpret_cast<void**>(&ptr_), n * sizeof(E)), "cudaMalloc",
              patchwork::detail::concat("cuda::Buffer(", n, " x ", sizeof(E), " bytes)"));
        size_ = n;
    }
    void free() noexcept {
        if (ptr_ != nullptr) cudaFree(ptr_);  // cudaFree synchronises the device: queued work finishes first
        ptr_ = nullptr;
        size_ = 0;
    }

    E* ptr_ = nullptr;
    std::size_t size_ = 0;
};

}  // namespace cuda

template <class T>
class Tensor<T, Cuda> {
    static_assert(is_tensor_scalar_v<T>, "patchwork::Tensor<T, Cuda> holds float, double or bf16");

public:
    using Scalar = T;
    using Device = Cuda;

    Tensor() = default;
    /// A zero-filled device tensor.
    explicit Tensor(const Shape& shape) : shape_(shape) {
        buf_.reserve(shape.numel());
        zero();
    }
    Tensor(const Shape& shape, T fill_value) : shape_(shape) {
        buf_.reserve(shape.numel());
        fill(fill_value);
    }
    /// A device copy of a host tensor.
    explicit Tensor(const Tensor<T, Cpu>& host) : shape_(host.shape()) {
        buf_.upload(std::span<const T>(host.data(), host.size()), "Tensor<T, Cuda>(host tensor)");
        cuda::synchronize("Tensor<T, Cuda>(host tensor)");  // the host tensor may go away right after
    }
    Tensor(const Tensor& o) : shape_(o.shape_) {
        buf_.reserve(o.size());
        copy_from(o);
    }
    Tensor& operator=(const Tensor& o) {
        if (this != &o) {
            resize(o.shape_);
            copy_from(o);
        }
        return *this;
    }
    Tensor(Tensor&&) noexcept = default;
    Tensor& operator=(Tensor&&) noexcept = default;

    [[nodiscard]] const Shape& shape() const noexcept { return shape_; }
    [[nodiscard]] std::size_t rank() const noexcept { return shape_.rank(); }
    [[nodiscard]] std::size_t dim(std::size_t i) const noexcept { return shape_[i]; }
    [[nodiscard]] std::size_t size() const noexcept { return shape_.rank() ? shape_.numel() : 0; }
    [[nodiscard]] bool empty() const noexcept { return size() == 0; }
    [[nodiscard]] std::size_t rows() const noexcept { return shape_.rows(); }
    [[nodiscard]] std::size_t cols() const noexcept { return shape_.back(); }
    /// Device pointers.
    [[nodiscard]] T* data() noexcept { return buf_.data(); }
    [[nodiscard]] const T* data() const noexcept { return buf_.data(); }

    void resize(const Shape& shape) {
        buf_.reserve(shape.numel());
        shape_ = shape;
    }
    void reshape(const Shape& shape) {
        if (shape.numel() != size())
            throw ShapeError(detail::concat("Tensor<T, Cuda>::reshape: cannot view ", shape_, " as ", shape));
        shape_ = shape;
    }
    void zero() { buf_.memset(0, size(), "Tensor<T, Cuda>::zero"); }
    /// Fill with a value (zero by memset, anything else through a host staging copy).
    void fill(T v) {
        if (v == T(0)) return zero();
        const std::vector<T> host(size(), v);
        buf_.upload(host, "Tensor<T, Cuda>::fill");
        cuda::synchronize("Tensor<T, Cuda>::fill");
    }
    /// Every byte 0xFF (NaN in float and double): tests poison outputs so unwritten elements show.
    void poison() { buf_.memset(0xFF, size(), "Tensor<T, Cuda>::poison"); }
    void clear() noexcept { shape_ = Shape{}; }
    void release() noexcept {
        buf_ = cuda::Buffer<T>();
        shape_ = Shape{};
    }

private:
    void copy_from(const Tensor& o) {
        if (o.size() == 0) return;
        cuda::check(cudaMemcpyAsync(buf_.data(), o.data(), o.size() * sizeof(T), cudaMemcpyDeviceToDevice,
                                    cuda::context().stream()),
                    "cudaMemcpyAsync(device to device)", "Tensor<T, Cuda> copy");
    }

    cuda::Buffer<T> buf_;
    Shape shape_;
};

/// Host tensor -> device tensor.
template <class T>
[[nodiscard]] Tensor<T, Cuda> to_device(const Tensor<T, Cpu>& host) {
    return Tensor<T, Cuda>(host);
}

/// Device tensor -> host tensor (waits for the current stream).
template <class T>
[[nodiscard]] Tensor<T, Cpu> to_host(const Tensor<T, Cuda>& dev) {
    Tensor<T, Cpu> out(dev.shape());
    if (dev.size() == 0) return out;
    cuda::check(cudaMemcpyAsync(out.data(), dev.data(), dev.size() * sizeof(T), cudaMemcpyDeviceToHost,
                                cuda::context().stream()),
                "cudaMemcpyAsync(device to host)", "to_host");
    cuda::synchronize("to_host");
    return out;
}

/// Copy values between tensors of equal shape on any devices.
template <class T>
void copy(const Tensor<T, Cpu>& src, Tensor<T, Cuda>& dst) {
    if (!(src.shape() == dst.shape()))
        throw ShapeError(detail::concat("copy: host ", src.shape(), " to device ", dst.shape()));
    if (src.size() == 0) return;
    cuda::check(cudaMemcpyAsync(dst.data(), src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice,
                                cuda::context().stream()),
                "cudaMemcpyAsync(host to device)", "copy");
    cuda::synchronize("copy");
}
template <class T>
void copy(const Tensor<T, Cuda>& src, Tensor<T, Cpu>& dst) {
    if (!(src.shape() == dst.shape()))
        throw ShapeError(detail::concat("copy: device ", src.shape(), " to host ", dst.shape()));
    if (src.size() == 0) return;
    cuda::check(cudaMemcpyAsync(dst.data(), src.data(), src.size() * sizeof(T), cudaMemcpyDeviceToHost,
                                cuda::context().stream()),
                "cudaMemcpyAsync(device to host)", "copy");
    cuda::synchronize("copy");
}

}  // namespace patchwork
