#include <omp.h>

#include "threads.h"

static int requested_threads; /* 0: OpenMP's default */

void set_kernel_threads(int threads) { requested_threads = threads > 0 ? threads : 0; }

int kernel_threads(void) { return requested_threads > 0 ? requested_threads : omp_get_max_threads(); }
