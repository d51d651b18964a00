/* How many threads the kernels' parallel regions use: set once by the engine (its `threads` option),
 * else OpenMP's default. Passed to every `omp parallel` explicitly because an OpenMP thread count set
 * with omp_set_num_threads holds only for the thread that set it, and the engine may step in another. */
#ifndef GORGON_THREADS_H
#define GORGON_THREADS_H

int kernel_threads(void);

#endif
