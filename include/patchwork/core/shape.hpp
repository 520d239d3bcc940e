#pragma once
// Shape: the dimensions of a tensor, at most four (N, C, H, W), stored inline.
#include <array>
#include <cstddef>
#include <initializer_list>
#include <ostream>
#include <string>

#include "patchwork/core/error.hpp"

namespace patchwork {

class Shape {
public:
    static constexpr std::size_t max_rank = 4;

    constexpr Shape() = default;
    Shape(std::initializer_list<std::size_t> dims) {
        if (dims.size() > max_rank)
            throw ShapeError(detail::concat("Shape: rank ", dims.size(), " exceeds the maximum of ", max_rank));
        for (std::size_t d : dims) dims_[rank_++] = d;
    }

    [[nodiscard]] constexpr std::size_t rank() const noexcept { return rank_; }
    [[nodiscard]] constexpr std::size_t operator[](std::size_t i) const noexcept { return dims_[i]; }
    [[nodiscard]] constexpr std::size_t& operator[](std::size_t i) noexcept { return dims_[i]; }
    [[nodiscard]] constexpr std::size_t back() const noexcept { return rank_ ? dims_[rank_ - 1] : 0; }

    /// Number of elements (1 for a rank-0 shape).
    [[nodiscard]] constexpr std::size_t numel() const noexcept {
        std::size_t n = 1;
        for (std::size_t i = 0; i < rank_; ++i) n *= dims_[i];
        return n;
    }
    /// Product of every dimension but the last: the row count of the matrix view.
    [[nodiscard]] constexpr std::size_t rows() const noexcept { return rank_ ? numel() / (back() ? back() : 1) : 1; }

    [[nodiscard]] Shape with_back(std::size_t last) const {
        Shape s = *this;
        if (s.rank_ == 0) s.rank_ = 1;
        s.dims_[s.rank_ - 1] = last;
        return s;
    }

    /// This shape with `first` put in front ([K] + [r, d] = [K, r, d]); a ShapeError past max_rank.
    [[nodiscard]] Shape prepended(std::size_t first) const {
        if (rank_ == max_rank)
            throw ShapeError(detail::concat("Shape: cannot put a dimension in front of ", str(), " (rank ", max_rank,
                                            " is the maximum)"));
        Shape s;
        s.rank_ = rank_ + 1;
        s.dims_[0] = first;
        for (std::size_t i = 0; i < rank_; ++i) s.dims_[i + 1] = dims_[i];
        return s;
    }

    [[nodiscard]] const std::size_t* begin() const noexcept { return dims_.data(); }
    [[nodiscard]] const std::size_t* end() const noexcept { return dims_.data() + rank_; }

    friend constexpr bool operator==(const Shape& a, const Shape& b) noexcept {
        if (a.rank_ != b.rank_) return false;
        for (std::size_t i = 0; i < a.rank_; ++i)
            if (a.dims_[i] != b.dims_[i]) return false;
        return true;
    }

    [[nodiscard]] std::string str() const {
        std::string s = "[";
        for (std::size_t i = 0; i < rank_; ++i) {
            if (i) s += ", ";
            s += std::to_string(dims_[i]);
        }
        return s + "]";
    }
    friend std::ostream& operator<<(std::ostream& os, const Shape& s) { return os << s.str(); }

private:
    std::array<std::size_t, max_rank> dims_{};
    std::size_t rank_ = 0;
};

}  // namespace patchwork
