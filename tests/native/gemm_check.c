/* The panel GEMM checked on its own, for targets this machine cannot load into Python (NEON under
 * qemu, see tests/test_other_architectures.py): every tile height, blocks of rows, k split in blocks,
 * ragged columns, bias and residual, against a double-precision reference, and each row bit-identical
 * to the same row multiplied alone. Exit status 0 when every check holds. */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
void pack_panels(const float *w_t, int64_t K, int64_t N, float *packed);
void gemm_panels(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
                 const float *bias, const float *residual, float *y);
static float rnd(void) { return (float)rand() / RAND_MAX - 0.5f; }
int main(void) {
    int64_t shapes[][2] = {{37, 50}, {320, 960}, {1500, 40}, {64, 16}};
    int64_t rows[] = {1, 2, 3, 5, 6, 7, 12, 13, 40, 300};
    int bad = 0;
    for (int s = 0; s < 4; ++s) {
        int64_t K = shapes[s][0], N = shapes[s][1];
        float *w = malloc(K * N * 4), *x = malloc(300 * K * 4), *b = malloc(N * 4), *r = malloc(300 * N * 4);
        float *p = malloc(((N + 15) / 16) * 16 * K * 4), *y = malloc(300 * N * 4), *y1 = malloc(N * 4);
        for (int64_t i = 0; i < K * N; ++i) w[i] = rnd();
        for (int64_t i = 0; i < 300 * K; ++i) x[i] = rnd();
        for (int64_t i = 0; i < N; ++i) b[i] = rnd();
        for (int64_t i = 0; i < 300 * N; ++i) r[i] = rnd();
        pack_panels(w, K, N, p);
        for (int ri = 0; ri < 10; ++ri) {
            int64_t M = rows[ri];
            gemm_panels(x, M, K, K, p, N, b, r, y);
            for (int64_t m = 0; m < M; ++m) {
                gemm_panels(x + m * K, 1, K, K, p, N, b, r + m * N, y1);   /* the row alone */
                if (memcmp(y1, y + m * N, N * 4)) { bad++; printf("row-invariance K=%ld N=%ld M=%ld m=%ld\n", K, N, M, m); break; }
                for (int64_t n = 0; n < N; ++n) {
                    double ref = b[n] + r[m * N + n];
                    for (int64_t k = 0; k < K; ++k) ref += (double)x[m * K + k] * w[k * N + n];
                    if (fabs(ref - y[m * N + n]) > 1e-3 + 1e-4 * fabs(ref)) { bad++; printf("value K=%ld N=%ld M=%ld\n", K, N, M); m = M; break; }
                }
            }
        }
    }
    printf(bad ? "FAIL %d\n" : "ok\n", bad);
    return bad != 0;
}
