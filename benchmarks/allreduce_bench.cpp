// All-reduce time against message size over patchwork::dist's MPI transport:
// the latency and bandwidth that docs/distributed.md's cost model uses.
//
//   mpirun -np 2 build-bench-dist/benchmarks/allreduce_bench [--max-mib 128] [--reps 20]
//
// For each size (float elements, 4 KiB to --max-mib MiB, by factors of 4) the
// median over --reps all-reduces of Communicator::allreduce_sum (an
// MPI_Iallreduce completed by wait()), after 3 warm-up calls, and the
// algorithm bandwidth (bytes / time). Printed by rank 0 as a Markdown table.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <patchwork/dist/mpi.hpp>

namespace dist = patchwork::dist;

int main(int argc, char** argv) {
    dist::MpiEnvironment env(argc, argv);
    dist::MpiCommunicator comm;
    std::size_t max_mib = 128, reps = 20;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string a = argv[i];
        if (a == "--max-mib") max_mib = std::strtoull(argv[i + 1], nullptr, 10);
        else if (a == "--reps") reps = std::strtoull(argv[i + 1], nullptr, 10);
    }
    if (comm.rank() == 0) {
        std::printf("all-reduce (sum, float) on %d ranks, median of %zu\n\n", comm.size(), reps);
        std::printf("| bytes | time (us) | bandwidth (MB/s) |\n|---:|---:|---:|\n");
    }
    for (std::size_t bytes = 4096; bytes <= max_mib * 1024 * 1024; bytes *= 4) {
        std::vector<float> data(bytes / sizeof(float), 1.0f);
        std::vector<double> times;
        for (std::size_t r = 0; r < reps + 3; ++r) {
            comm.barrier();
            const auto t0 = std::chrono::steady_clock::now();
            comm.allreduce_sum(data.data(), data.size());
            const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (r >= 3) times.push_back(s);
        }
        std::sort(times.begin(), times.end());
        const double med = times[times.size() / 2];
        // The slowest rank's median is the collective's time.
        double worst = med;
        std::vector<double> all(std::size_t(comm.size()));
        comm.allgather(&med, all.data(), sizeof med);
        for (double t : all) worst = std::max(worst, t);
        if (comm.rank() == 0) std::printf("| %zu | %.1f | %.0f |\n", bytes, worst * 1e6, double(bytes) / worst / 1e6);
    }
    return 0;
}
