#pragma once
// Progress reporting for training loops.
//
// On a terminal (stdout is a tty) one line is redrawn in place with '\r':
//   epoch 2/5 [#########...............]  150/400  loss 0.4321  12.3k samples/s  ETA 1:02
// and replaced by the epoch summary when the epoch ends. Anywhere else (a log
// file, a pipe, CI) plain lines are printed every `log_every` steps and at the
// end of each epoch, so logs stay readable:
//   epoch 2/5  step 150/400  loss 0.4321  12.3k samples/s  ETA 1:02
//   epoch 2/5  done  loss 0.4012  acc 87.50%  12.1k samples/s  3.31 s  lr 0.001
//
// The reporter does no timing of its own: callers pass elapsed seconds, which
// keeps it deterministic under test. The stream and the terminal decision are
// injectable: Progress(os, interactive) with interactive = true/false forces a
// mode, std::nullopt detects it (true only for std::cout on a tty, std::cerr
// on a tty). The ETA assumes every remaining step of the run costs what the
// steps of the current epoch did on average.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>

#if defined(_WIN32)
#include <io.h>
#else
#include <unistd.h>
#endif

namespace patchwork {

/// True when `os` is std::cout or std::cerr and that stream is a terminal.
[[nodiscard]] inline bool is_terminal(const std::ostream& os) {
#if defined(_WIN32)
    if (&os == &std::cout) return _isatty(_fileno(stdout)) != 0;
    if (&os == &std::cerr || &os == &std::clog) return _isatty(_fileno(stderr)) != 0;
#else
    if (&os == &std::cout) return isatty(fileno(stdout)) != 0;
    if (&os == &std::cerr || &os == &std::clog) return isatty(fileno(stderr)) != 0;
#endif
    return false;
}

/// Where a training step stands; `loss` is the running mean of the epoch so far.
struct StepProgress {
    std::size_t epoch = 0;   ///< 0-based
    std::size_t epochs = 1;
    std::size_t step = 0;    ///< steps done in this epoch (1-based once one is done)
    std::size_t steps = 0;   ///< steps per epoch
    double loss = 0;
    double samples_per_second = 0;
    double elapsed_seconds = 0;  ///< since the start of this epoch
};

/// What an epoch achieved.
struct EpochProgress {
    std::size_t epoch = 0;  ///< 0-based
    std::size_t epochs = 1;
    double loss = 0;
    std::optional<double> accuracy{};  ///< in [0, 1], when the batches had labels
    double samples_per_second = 0;
    double seconds = 0;
    std::optional<double> lr{};
};

class Progress {
public:
    /// `interactive`: std::nullopt detects a terminal, true/false forces the mode.
    /// `log_every`: plain-mode step lines every that many steps (0: epoch lines only).
    explicit Progress(std::ostream& os = std::cout, std::optional<bool> interactive = std::nullopt,
                      std::size_t log_every = 50)
        : os_(&os), interactive_(interactive.value_or(is_terminal(os))), log_every_(log_every) {}

    [[nodiscard]] bool interactive() const noexcept { return interactive_; }
    [[nodiscard]] std::size_t log_every() const noexcept { return log_every_; }

    /// Seconds between redraws of the terminal line (the first and last step are always drawn).
    void set_redraw_interval(double seconds) noexcept { redraw_interval_ = seconds; }

    /// Report a finished step.
    void update(const StepProgress& s) {
        if (interactive_) {
            const bool last = s.step >= s.steps;
            if (!last && drawn_epoch_ == s.epoch && s.elapsed_seconds - last_draw_ < redraw_interval_) return;
            drawn_epoch_ = s.epoch;
            last_draw_ = s.elapsed_seconds;
            draw(bar_line(s));
        } else if (log_every_ != 0 && s.step % log_every_ == 0 && s.step < s.steps) {
            *os_ << step_line(s) << '\n' << std::flush;
        }
    }

    /// Report a finished epoch (replaces the bar on a terminal).
    void end_epoch(const EpochProgress& e) {
        if (interactive_) {
            draw(epoch_line(e));
            *os_ << '\n' << std::flush;
            width_ = 0;
            drawn_epoch_ = npos;
        } else {
            *os_ << epoch_line(e) << '\n' << std::flush;
        }
    }

    /// Plain text lines, exposed for custom reporters.
    [[nodiscard]] static std::string step_line(const StepProgress& s) {
        std::ostringstream o;
        o << epoch_label(s.epoch, s.epochs) << "  step " << s.step << '/' << s.steps << "  loss "
          << format_loss(s.loss) << "  " << format_rate(s.samples_per_second) << " samples/s  ETA "
          << format_duration(eta(s));
        return o.str();
    }
    [[nodiscard]] static std::string bar_line(const StepProgress& s, std::size_t width = 24) {
        const double frac = s.steps ? std::min(1.0, double(s.step) / double(s.steps)) : 1.0;
        const auto filled = std::size_t(frac * double(width));
        std::ostringstream o;
        o << epoch_label(s.epoch, s.epochs) << " [" << std::string(filled, '#') << std::string(width - filled, '.')
          << "] " << std::setw(int(std::to_string(s.steps).size())) << s.step << '/' << s.steps << "  loss "
          << format_loss(s.loss) << "  " << format_rate(s.samples_per_second) << " samples/s  ETA "
          << format_duration(eta(s));
        return o.str();
    }
    [[nodiscard]] static std::string epoch_line(const EpochProgress& e) {
        std::ostringstream o;
        o << epoch_label(e.epoch, e.epochs) << "  done  loss " << format_loss(e.loss);
        if (e.accuracy) o << "  acc " << std::fixed << std::setprecision(2) << 100.0 * *e.accuracy << '%';
        o << "  " << format_rate(e.samples_per_second) << " samples/s  " << std::fixed << std::setprecision(2)
          << e.seconds << " s";
        if (e.lr) o << "  lr " << std::defaultfloat << std::setprecision(4) << *e.lr;
        return o.str();
    }

    /// "1.23k", "45.6M": three significant digits.
    [[nodiscard]] static std::string format_rate(double r) {
        const char* suffix = "";
        if (r >= 1e9) { r /= 1e9; suffix = "G"; }
        else if (r >= 1e6) { r /= 1e6; suffix = "M"; }
        else if (r >= 1e3) { r /= 1e3; suffix = "k"; }
        std::ostringstream o;
        o << std::fixed << std::setprecision(r >= 100 ? 0 : (r >= 10 ? 1 : 2)) << r << suffix;
        return o.str();
    }
    /// "m:ss" or "h:mm:ss"; "?" when unknown.
    [[nodiscard]] static std::string format_duration(double seconds) {
        if (!std::isfinite(seconds) || seconds < 0) return "?";
        const auto total = static_cast<unsigned long long>(std::llround(seconds));
        const auto h = total / 3600, m = (total / 60) % 60, s = total % 60;
        std::ostringstream o;
        o << std::setfill('0');
        if (h) o << h << ':' << std::setw(2) << m;
        else o << m;
        o << ':' << std::setw(2) << s;
        return o.str();
    }

private:
    static constexpr std::size_t npos = std::size_t(-1);

    static std::string epoch_label(std::size_t epoch, std::size_t epochs) {
        return "epoch " + std::to_string(epoch + 1) + '/' + std::to_string(epochs);
    }
    static std::string format_loss(double loss) {
        std::ostringstream o;
        o << std::fixed << std::setprecision(4) << loss;
        return o.str();
    }
    static double eta(const StepProgress& s) {
        if (s.step == 0) return -1;
        const double per_step = s.elapsed_seconds / double(s.step);
        const double remaining = double(s.steps - std::min(s.step, s.steps)) +
                                 double(s.epochs > s.epoch + 1 ? s.epochs - s.epoch - 1 : 0) * double(s.steps);
        return per_step * remaining;
    }

    /// Redraw the terminal line, blanking what is left of a longer previous one.
    void draw(const std::string& line) {
        *os_ << '\r' << line;
        if (line.size() < width_) *os_ << std::string(width_ - line.size(), ' ');
        width_ = std::max(width_, line.size());
        *os_ << std::flush;
    }

    std::ostream* os_;
    bool interactive_;
    std::size_t log_every_;
    double redraw_interval_ = 0.1;
    double last_draw_ = 0;
    std::size_t drawn_epoch_ = npos;
    std::size_t width_ = 0;
};

}  // namespace patchwork
