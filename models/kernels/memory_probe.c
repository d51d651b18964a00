/* How fast this machine streams memory into the cores: the sum of a buffer far larger than the caches,
 * every thread summing its own contiguous share with independent vector accumulators (as the products
 * stream their weights). Benchmarks divide a decode step's weight bytes by it: the bandwidth roofline.
 * A sum in torch reads slower than the quantized product streams its weights on the same machine, so
 * it would flatter the roofline fraction. */
#include <omp.h>
#include <stdint.h>

#include "threads.h"

#define LANES 64   /* four AVX-512 vectors or eight AVX2 ones of partial sums: loads, not adds, bound it */

float read_bandwidth_probe(const float *buffer, int64_t n) {
    float total = 0.0f;
#pragma omp parallel num_threads(kernel_threads()) reduction(+ : total)
    {
        const int64_t count = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t begin = n / LANES * me / count * LANES, end = n / LANES * (me + 1) / count * LANES;
        float partial[LANES] = {0};
        for (int64_t i = begin; i < end; i += LANES) {
#pragma omp simd
            for (int j = 0; j < LANES; ++j) partial[j] += buffer[i + j];
        }
        for (int j = 0; j < LANES; ++j) total += partial[j];
    }
    return total;
}
