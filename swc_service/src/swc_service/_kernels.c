/* SwC and PD, compiled: see method.py for the semantics.
 *
 * swc: all of SwC in one call. Similarities: one float32 dot product per background row; the
 *   features stay in the memory-mapped bundle (float16 by default) and are converted in
 *   registers (F16C), so nothing the size of a cell is allocated or copied. Every row is summed
 *   the same way: 32 float32 partial sums (four 8-lane fused multiply-adds over consecutive
 *   elements), a fixed reduction tree, then the tail with fmaf; the portable path performs the
 *   same operations in the same order, so both paths give the same bits on every machine and
 *   equal rows tie exactly. Then a stable top k, DBSCAN(min_samples=1) over the candidates and
 *   the mean of the largest cluster, with geo.py's arithmetic in the same order.
 *
 * pd_mass: Prediction Density around the top cell and the mass around any claimed points, in one
 *   pass over the cell index. Scales come largest first. "Within scale s" is decided by the dot
 *   product of unit vectors against cos(s / R): a cell within a scale is within every larger one,
 *   so one level per cell and origin says which; cells too close to a threshold to decide that way
 *   are settled on the spot by the reference haversine. The selected cells are walked in
 *   ascending id order and each selection's float32 probabilities are added exactly as numpy
 *   1.x's float32 add.reduce does: pairwise summation over chunks of the ufunc buffer size
 *   (8192), chunk sums accumulated in order, so each value equals the reference's
 *   probs[d <= s].sum() bit for bit. For a point, also its nearest cell and that cell's rank.
 *   pd_select: the same selection for one origin, as a list of cells (the cells within a radius
 *   of a claim).
 *
 * haversine / latlon_to_unit: the service's great-circle geometry (geo.py wraps them), so SwC's
 *   clustering, PD's boundary cases and everything else use one implementation.
 *
 * No numpy headers: arguments are buffers; method.py checks dtypes and shapes first and the
 * functions here check sizes again. The GIL is released while they run.
 *
 * Build with -ffp-contract=off: the compiler must not fuse or reorder the float arithmetic.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define VISLOC_X86 1
#else
#define VISLOC_X86 0
#endif

#define LANES 32             /* partial sums per row: 4 vectors x 8 float32 lanes */
#define NUMPY_BUFSIZE 8192   /* numpy's default ufunc buffer size (np.getbufsize()) */
#define PW_BLOCKSIZE 128     /* numpy's pairwise summation block */
#define MAX_SCALES 32
#define PI 3.141592653589793
#define EARTH_RADIUS_KM 6371.0

static int use_simd = 0;

/* Every buffer a function's argument parsing acquired, released on its one way out. */
static void release_buffers(Py_buffer *const *bufs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        PyBuffer_Release(bufs[i]);
}
#define RELEASE(...) \
    release_buffers((Py_buffer *const[]){__VA_ARGS__}, sizeof((Py_buffer *const[]){__VA_ARGS__}) / sizeof(Py_buffer *))


/* ------------------------------------------------------------------ float16 -> float32 */

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exponent == 0) {
        /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        f = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13); /* inf, nan */
    }
    else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ------------------------------------------------------------------ dot products */

/* The reduction tree of the 32 partial sums: lane l of the four vectors first, then 8 -> 4
 * -> 2 -> 1 lanes (the AVX2 path below does exactly this with vector adds). */
static float reduce_lanes(const float acc[LANES])
{
    float s[8], h4[4], h2[2];
    for (int l = 0; l < 8; l++)
        s[l] = (acc[l] + acc[8 + l]) + (acc[16 + l] + acc[24 + l]);
    for (int l = 0; l < 4; l++)
        h4[l] = s[l] + s[l + 4];
    for (int l = 0; l < 2; l++)
        h2[l] = h4[l] + h4[l + 2];
    return h2[0] + h2[1];
}

static void dot_rows_portable(const void *rows, int half, Py_ssize_t n, Py_ssize_t d, const float *q, float *out)
{
    Py_ssize_t body = d - d % LANES;
    for (Py_ssize_t r = 0; r < n; r++) {
        float acc[LANES] = {0};
        float total;
        if (half) {
            const uint16_t *x = (const uint16_t *)rows + r * d;
            for (Py_ssize_t j = 0; j < body; j += LANES)
                for (int l = 0; l < LANES; l++)
                    acc[l] = fmaf(half_to_float(x[j + l]), q[j + l], acc[l]);
            total = reduce_lanes(acc);
            for (Py_ssize_t j = body; j < d; j++)
                total = fmaf(half_to_float(x[j]), q[j], total);
        }
        else {
            const float *x = (const float *)rows + r * d;
            for (Py_ssize_t j = 0; j < body; j += LANES)
                for (int l = 0; l < LANES; l++)
                    acc[l] = fmaf(x[j + l], q[j + l], acc[l]);
            total = reduce_lanes(acc);
            for (Py_ssize_t j = body; j < d; j++)
                total = fmaf(x[j], q[j], total);
        }
        out[r] = total;
    }
}

#if VISLOC_X86
__attribute__((target("avx2,fma,f16c"))) static float reduce_vectors(__m256 a0, __m256 a1, __m256 a2, __m256 a3)
{
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

/* The rows are read once, in order, straight from the page cache: the hardware prefetcher stops
 * at each 4 KB page, so every line is also requested this far ahead (a cold cell's rows cost ~10 %
 * less per row; bench/postprocess_cost.py). A prefetch changes no arithmetic and never faults. */
#define PREFETCH_BYTES 4096

__attribute__((target("avx2,fma,f16c"))) static void dot_rows_avx2(const void *rows, int half, Py_ssize_t n,
                                                                    Py_ssize_t d, const float *q, float *out)
{
    Py_ssize_t body = d - d % LANES;
    for (Py_ssize_t r = 0; r < n; r++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        float total;
        if (half) {
            const uint16_t *x = (const uint16_t *)rows + r * d;
#define LOADH(off) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + j + (off))))
            for (Py_ssize_t j = 0; j < body; j += LANES) {
                _mm_prefetch((const char *)(x + j) + PREFETCH_BYTES, _MM_HINT_T0);
                a0 = _mm256_fmadd_ps(LOADH(0), _mm256_loadu_ps(q + j), a0);
                a1 = _mm256_fmadd_ps(LOADH(8), _mm256_loadu_ps(q + j + 8), a1);
                a2 = _mm256_fmadd_ps(LOADH(16), _mm256_loadu_ps(q + j + 16), a2);
                a3 = _mm256_fmadd_ps(LOADH(24), _mm256_loadu_ps(q + j + 24), a3);
            }
#undef LOADH
            total = reduce_vectors(a0, a1, a2, a3);
            for (Py_ssize_t j = body; j < d; j++)
                total = fmaf(half_to_float(x[j]), q[j], total);
        }
        else {
            const float *x = (const float *)rows + r * d;
            for (Py_ssize_t j = 0; j < body; j += LANES) {
                _mm_prefetch((const char *)(x + j) + PREFETCH_BYTES, _MM_HINT_T0);
                _mm_prefetch((const char *)(x + j) + PREFETCH_BYTES + 64, _MM_HINT_T0);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(q + j), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(q + j + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 16), _mm256_loadu_ps(q + j + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 24), _mm256_loadu_ps(q + j + 24), a3);
            }
            total = reduce_vectors(a0, a1, a2, a3);
            for (Py_ssize_t j = body; j < d; j++)
                total = fmaf(x[j], q[j], total);
        }
        out[r] = total;
    }
}
#endif


/* ------------------------------------------------------------------ Prediction Density */

/* For the cells that can be within the largest scale, in index order: the level (how many
 * scales, largest first, the dot product alone shows the cell to be within) and how many of
 * the next scales are too close to call (|dot - cos(s/R)| <= band).
 *
 * The cells come grouped by a 5-degree grid (method.py builds the index): a group whose
 * spherical cap (centre, radius) lies beyond the largest scale is skipped whole, so only the
 * cells near the top cell are touched. A bitmap over cell indices (one per origin) then puts the
 * near cells back in index order, the order the sums need. */
static double haversine_km(double lat1, double lon1, double lat2, double lon2);
static void to_unit(double lat_deg, double lon_deg, double *xyz);

#define TIE_DOT 1e-12   /* nearest cell: dot products this close go to the reference haversine */
#define TIE_KM 1e-9     /* nearest cell: distances this close (a micrometre) are one distance: lower id */
#define MAX_NEAR 16     /* near-tied candidates kept while scanning; more: a full rescan */
#define MAX_ORIGINS 17  /* pd_mass: the top cell and up to 16 points (claims) in one pass */
#define DERIVE_SHARE 25 /* a point within theta_max / 25 of origin 0 takes its levels from origin 0's dot */
#define DERIVE_EPS 1e-6 /* radians (6 m) added to each side of a derived point's bands: rounding never decides */
#define NEAR_EPS 1e-5   /* radians: a derived point's nearest cell is sought within 2 delta + this of origin 0 */

/* The cell index of method.DensityIndex, borrowed from its buffers. */
typedef struct {
    Py_ssize_t m, groups;
    const double *ux, *uy, *uz; /* unit vectors [3, M] in group order */
    const int32_t *index_at;    /* cell id at each group-order position */
    const int32_t *position_of; /* group-order position of each cell id */
    const int32_t *start;       /* group starts [G + 1] */
    const double *caps;         /* [G, 6]: the group's spherical cap: centre xyz, cos r, sin r, r */
} cell_index;

/* Whether any cell of group cap `cap` can lie within angle theta (cos, sin given) of unit vector c:
 * not when angle(c, centre) > theta + r (tested on the dot product, conservatively). */
static inline int cap_reaches(const double *cap, const double *c, double theta, double cos_t, double sin_t)
{
    if (theta + cap[5] >= PI)
        return 1;
    const double dc = cap[0] * c[0] + cap[1] * c[1] + cap[2] * c[2];
    return !(dc < cos_t * cap[3] - sin_t * cap[4] - 1e-9);
}

/* Within how many of the largest scales a dot product puts a cell (thresholds ascending, with the
 * band around each) and how many next scales are too close to call that way. */
static inline uint32_t dot_level(double dot, const double *above, const double *below, Py_ssize_t s,
                                 uint32_t *unsure)
{
    uint32_t level = 0, maybe = 0;
    while (level < s && dot > above[level])
        level++;
    while (level + maybe < s && dot >= below[level + maybe]) /* almost never */
        maybe++;
    *unsure = maybe;
    return level;
}

/* A level too close to call: the reference haversine `d` decides how many of the unsure next
 * scales (`km`, largest first) the cell is within. */
static inline uint32_t settle_level(uint32_t level, uint32_t unsure, double d, const double *km)
{
    uint32_t settled = level;
    for (uint32_t i = level; i < level + unsure; i++)
        settled += d <= km[i];
    return settled;
}

/* The cells whose dot product with a point is largest (within TIE_DOT of the largest). */
typedef struct {
    double best;
    int n, overflow;
    int32_t cell[MAX_NEAR];
    double dot[MAX_NEAR];
} nearest_set;

static inline void nearest_see(nearest_set *ns, double dot, int32_t j)
{
    if (dot < ns->best - TIE_DOT)
        return;
    if (dot > ns->best) {
        ns->best = dot;
        int kept = 0;
        for (int i = 0; i < ns->n; i++) {
            if (ns->dot[i] >= dot - TIE_DOT) {
                ns->cell[kept] = ns->cell[i];
                ns->dot[kept++] = ns->dot[i];
            }
        }
        ns->n = kept;
    }
    if (ns->n < MAX_NEAR) {
        ns->cell[ns->n] = j;
        ns->dot[ns->n++] = dot;
    } else {
        ns->overflow = 1;
    }
}

static void nearest_scan_group(const cell_index *ix, Py_ssize_t g, const double *c, nearest_set *ns)
{
    for (Py_ssize_t q = ix->start[g]; q < ix->start[g + 1]; q++)
        nearest_see(ns, ix->ux[q] * c[0] + ix->uy[q] * c[1] + ix->uz[q] * c[2], ix->index_at[q]);
}

/* Fill `ns` from every cell, for a point beyond the largest scale from all cells (or whose
 * near-ties reach below it): the group with the nearest cap centre first, then every group
 * that can still hold a cell within TIE_DOT of the best dot product. */
static void nearest_everywhere(const cell_index *ix, const double *c, nearest_set *ns)
{
    ns->best = -INFINITY;
    ns->n = ns->overflow = 0;
    Py_ssize_t first = 0;
    double closest = -INFINITY;
    for (Py_ssize_t g = 0; g < ix->groups; g++) {
        const double *cap = ix->caps + 6 * g;
        const double dc = cap[0] * c[0] + cap[1] * c[1] + cap[2] * c[2];
        if (dc > closest)
            closest = dc, first = g;
    }
    nearest_scan_group(ix, first, c, ns);
    double floor = NAN, theta = 0, cos_t = 1, sin_t = 0;
    for (Py_ssize_t g = 0; g < ix->groups; g++) {
        if (g == first)
            continue;
        if (ns->best - TIE_DOT != floor) { /* the best moved: the angle a group must come within */
            floor = ns->best - TIE_DOT;
            theta = acos(floor < -1.0 ? -1.0 : (floor > 1.0 ? 1.0 : floor));
            cos_t = cos(theta), sin_t = sin(theta);
        }
        if (cap_reaches(ix->caps + 6 * g, c, theta, cos_t, sin_t))
            nearest_scan_group(ix, g, c, ns);
    }
}

/* The nearest cell by the reference haversine among the cells of largest dot product (the dot
 * ranks; a near-tie goes to haversine; distances within TIE_KM: the lower id). An overflowed set
 * is settled by passes over every cell. Writes the distance. */
static int32_t nearest_settle(const cell_index *ix, const double *centres, const double *c, double lat, double lon,
                              const nearest_set *ns, double *km)
{
    double dmin = INFINITY, d[MAX_NEAR];
    int32_t chosen = -1;
    if (!ns->overflow) {
        for (int i = 0; i < ns->n; i++) {
            d[i] = haversine_km(lat, lon, centres[2 * ns->cell[i]], centres[2 * ns->cell[i] + 1]);
            if (d[i] < dmin)
                dmin = d[i];
        }
        for (int i = 0; i < ns->n; i++)
            if (d[i] <= dmin + TIE_KM && (chosen < 0 || ns->cell[i] < chosen))
                chosen = ns->cell[i];
    } else {
        const double floor = ns->best - TIE_DOT;
        for (int pass = 0; pass < 2; pass++) {
            for (Py_ssize_t q = 0; q < ix->m; q++) {
                if (ix->ux[q] * c[0] + ix->uy[q] * c[1] + ix->uz[q] * c[2] < floor)
                    continue;
                const int32_t j = ix->index_at[q];
                const double dq = haversine_km(lat, lon, centres[2 * j], centres[2 * j + 1]);
                if (pass == 0 && dq < dmin)
                    dmin = dq;
                if (pass == 1 && dq <= dmin + TIE_KM && (chosen < 0 || j < chosen))
                    chosen = j;
            }
        }
    }
    *km = haversine_km(lat, lon, centres[2 * chosen], centres[2 * chosen + 1]);
    return chosen;
}

/* The index buffers, checked against each other; 0 with a ValueError set if they do not match. */
static int index_of(cell_index *ix, const Py_buffer *units, const Py_buffer *cell_at, const Py_buffer *position_of,
                    const Py_buffer *starts, const Py_buffer *caps, const Py_buffer *bitmap, const char *who)
{
    const Py_ssize_t m = cell_at->len / 4, groups = starts->len / 4 - 1;
    if (m < 1 || cell_at->len % 4 || units->len != 3 * m * 8 || position_of->len != m * 4 || groups < 1 ||
        caps->len != groups * 6 * 8 || bitmap->len < (m + 63) / 64 * 8) {
        PyErr_Format(PyExc_ValueError, "%s: the cell index buffers do not match", who);
        return 0;
    }
    ix->m = m;
    ix->groups = groups;
    ix->ux = (const double *)units->buf;
    ix->uy = ix->ux + m;
    ix->uz = ix->ux + 2 * m;
    ix->index_at = (const int32_t *)cell_at->buf;
    ix->position_of = (const int32_t *)position_of->buf;
    ix->start = (const int32_t *)starts->buf;
    ix->caps = (const double *)caps->buf;
    return 1;
}

/* 1 to MAX_SCALES thresholds ascending; 0 with a ValueError set otherwise. */
static int thresholds_ok(const Py_buffer *thresholds, const char *who)
{
    const Py_ssize_t s = thresholds->len / (Py_ssize_t)sizeof(double);
    const double *t = (const double *)thresholds->buf;
    if (s < 1 || s > MAX_SCALES || thresholds->len % sizeof(double)) {
        PyErr_Format(PyExc_ValueError, "%s: 1 to %d scales, got %zd", who, MAX_SCALES, s);
        return 0;
    }
    for (Py_ssize_t i = 1; i < s; i++) {
        if (!(t[i - 1] <= t[i])) {
            PyErr_Format(PyExc_ValueError, "%s: thresholds must ascend (scales descend)", who);
            return 0;
        }
    }
    return 1;
}

/* numpy 1.x FLOAT_pairwise_sum (numpy/core/src/umath/loops_utils.h.src), contiguous. */
static float pairwise_sum(const float *a, Py_ssize_t n)
{
    if (n < 8) {
        float res = -0.0f;
        for (Py_ssize_t i = 0; i < n; i++)
            res += a[i];
        return res;
    }
    if (n <= PW_BLOCKSIZE) {
        float r[8];
        Py_ssize_t i;
        for (int k = 0; k < 8; k++)
            r[k] = a[k];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++)
                r[k] += a[i + k];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += a[i];
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* np.add.reduce over a contiguous float32 array: the identity, then each buffer-sized chunk. */
static float numpy_sum(const float *a, Py_ssize_t n)
{
    float res = 0.0f;
    for (Py_ssize_t start = 0; start < n; start += NUMPY_BUFSIZE)
        res += pairwise_sum(a + start, n - start < NUMPY_BUFSIZE ? n - start : NUMPY_BUFSIZE);
    return res;
}

/* 1 if order holds s slots in [0, s); 0 with a ValueError set otherwise. */
static int order_ok(const Py_buffer *order, Py_ssize_t s, const char *who)
{
    const int64_t *slot = (const int64_t *)order->buf;
    if (order->len != s * 8) {
        PyErr_Format(PyExc_ValueError, "%s: buffer sizes do not match", who);
        return 0;
    }
    for (Py_ssize_t i = 0; i < s; i++) {
        if (slot[i] < 0 || slot[i] >= s) {
            PyErr_Format(PyExc_ValueError, "%s: order is not a permutation of the scales", who);
            return 0;
        }
    }
    return 1;
}

/* 1 + the cells before `cell` by probability (more probable, or as probable with a lower id): one
 * pass, p[i] >= p[cell] before the cell and p[i] > p[cell] after it (NaN never counts). */
static Py_ssize_t rank_portable(const float *p, Py_ssize_t m, Py_ssize_t cell)
{
    const float pc = p[cell];
    Py_ssize_t before = 0;
    for (Py_ssize_t a = 0; a < m; a += 1 << 20) { /* 32-bit counts in blocks: the compiler vectorizes them */
        const Py_ssize_t b = m - a < (1 << 20) ? m : a + (1 << 20);
        const Py_ssize_t c = cell < a ? a : (cell < b ? cell : b);
        uint32_t n = 0;
        for (Py_ssize_t i = a; i < c; i++)
            n += p[i] >= pc;
        for (Py_ssize_t i = c; i < b; i++)
            n += p[i] > pc;
        before += (Py_ssize_t)n;
    }
    return 1 + before; /* the cell itself is in the second loop: p[cell] > p[cell] never holds */
}

#if VISLOC_X86
/* The cells in [a, b) at or above pc (ge) or above it: 8 at a time, each true lane -1 (at most
 * 2^31 cells, so no lane's count overflows). */
__attribute__((target("avx2"))) static Py_ssize_t count_avx2(const float *p, Py_ssize_t a, Py_ssize_t b, float pc,
                                                             int ge)
{
    const __m256 v = _mm256_set1_ps(pc);
    __m256i n = _mm256_setzero_si256();
    Py_ssize_t i = a, count = 0;
    for (; i + 8 <= b; i += 8) {
        const __m256 x = _mm256_loadu_ps(p + i);
        const __m256 hit = ge ? _mm256_cmp_ps(x, v, _CMP_GE_OQ) : _mm256_cmp_ps(x, v, _CMP_GT_OQ);
        n = _mm256_sub_epi32(n, _mm256_castps_si256(hit));
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, n);
    for (int k = 0; k < 8; k++)
        count += lanes[k];
    for (; i < b; i++)
        count += ge ? p[i] >= pc : p[i] > pc;
    return count;
}
#endif

static Py_ssize_t rank_of(const float *p, Py_ssize_t m, Py_ssize_t cell)
{
#if VISLOC_X86
    if (use_simd)
        return 1 + count_avx2(p, 0, cell, p[cell], 1) + count_avx2(p, cell + 1, m, p[cell], 0);
#endif
    return rank_portable(p, m, cell);
}

/* One origin of a selection: a cell's centre, or a point. A point close to origin 0 is derived:
 * its levels come from origin 0's dot product wherever that decides them (see derive). */
typedef struct {
    double c[3], lat, lon;
    int point, derived;
    /* derived only: the angle from origin 0; origin 0's dot product above hi[i]: within scale i,
     * below lo[i]: not; origin 0's dot from which a cell may be the point's nearest; the point's own
     * dot above which every cell was offered as its nearest */
    double delta, hi[MAX_SCALES], lo[MAX_SCALES], near0, seen;
} origin;

/* The origin at row o of origins [P, 3] float64: (cell, 0, 0) for a cell's centre, (-1, lat, lon)
 * for a point; 0 with a ValueError set if it is neither. */
static int origin_of(origin *org, const double *row, Py_ssize_t o, const cell_index *ix, const double *ll,
                     const char *who)
{
    const double cell = row[0], lat = row[1], lon = row[2];
    char text[64];
    org->derived = 0;
    if (cell == -1.0) {
        if (!(isfinite(lat) && isfinite(lon) && fabs(lat) <= 90.0 && fabs(lon) <= 180.0)) {
            PyOS_snprintf(text, sizeof text, "(%.17g, %.17g)", lat, lon);
            PyErr_Format(PyExc_ValueError, "%s: origin %zd: a point needs lat in [-90, 90] and lon in [-180, 180], "
                         "got %s", who, o, text);
            return 0;
        }
        org->point = 1, org->lat = lat, org->lon = lon;
        to_unit(lat, lon, org->c);
        return 1;
    }
    if (cell >= 0 && cell < (double)ix->m && cell == floor(cell)) {
        const Py_ssize_t j = (Py_ssize_t)cell, p = ix->position_of[j];
        org->point = 0, org->lat = ll[2 * j], org->lon = ll[2 * j + 1];
        org->c[0] = ix->ux[p], org->c[1] = ix->uy[p], org->c[2] = ix->uz[p];
        return 1;
    }
    PyOS_snprintf(text, sizeof text, "%.17g", cell);
    PyErr_Format(PyExc_ValueError, "%s: origin %zd: cell %s outside %zd cells (-1: a point)", who, o, text, ix->m);
    return 0;
}

/* Derive point `o` from origin 0 when it lies within theta_max / DERIVE_SHARE of it (a claim near
 * the predicted cell: the two selections share nearly every cell). On the sphere a cell's angle
 * from the point differs from its angle from origin 0 by at most delta (the triangle
 * inequality), so where origin 0's dot product lies outside the band [lo[i], hi[i]] around scale
 * i (the angles theta_i -+ (delta + DERIVE_EPS), widened to the dot product's own band), the
 * cell is on the same side of scale i for both. Only cells in a band (and those that may be the
 * point's nearest) need the point's own dot product, and take exactly the path an independent
 * point takes (its own levels, settled by haversine); the point keeps only the cells where its
 * level differs from origin 0's. Bands ascend with the thresholds, as the thresholds do. */
static void derive(origin *o, const origin *o0, double theta_max, const double *t, const double *km, Py_ssize_t s,
                   double band)
{
    const double dx = o->c[0] - o0->c[0], dy = o->c[1] - o0->c[1], dz = o->c[2] - o0->c[2];
    const double half_chord = sqrt(dx * dx + dy * dy + dz * dz) / 2.0;
    const double delta = 2.0 * asin(half_chord > 1.0 ? 1.0 : half_chord); /* accurate for small angles */
    if (!o->point || !(delta <= theta_max / DERIVE_SHARE))
        return;
    o->derived = 1;
    o->delta = delta;
    for (Py_ssize_t i = 0; i < s; i++) {
        const double theta = km[i] / EARTH_RADIUS_KM < PI ? km[i] / EARTH_RADIUS_KM : PI;
        const double in = theta - delta - DERIVE_EPS, out = theta + delta + DERIVE_EPS;
        const double hi = in > 0.0 ? cos(in) : INFINITY, lo = out < PI ? cos(out) : -INFINITY;
        o->hi[i] = hi > t[i] + band ? hi : t[i] + band;
        o->lo[i] = lo < t[i] - band ? lo : t[i] - band;
    }
    const double near = 2.0 * delta + NEAR_EPS;
    o->near0 = near < PI ? cos(near) : -INFINITY;
    o->seen = cos(delta + NEAR_EPS / 2.0);
}

/* A level from an origin's own dot product, as for every origin: the dot product against the
 * thresholds with `band` around each (above, below), the reference haversine when too close. */
__attribute__((always_inline)) static inline uint32_t own_level(double dot, const origin *o, const double *ll,
                                                                int32_t j, const double *above, const double *below,
                                                                const double *km, Py_ssize_t s, Py_ssize_t *settled)
{
    if (dot > above[0] && dot < below[1]) /* within the largest scale only: the common case */
        return 1;
    uint32_t unsure;
    uint32_t level = dot_level(dot, above, below, s, &unsure);
    if (unsure) { /* too close to a threshold for the dot product: the reference haversine */
        level = settle_level(level, unsure, haversine_km(o->lat, o->lon, ll[2 * j], ll[2 * j + 1]), km);
        (*settled)++;
    }
    return level;
}

__attribute__((always_inline)) static inline void set_bit(uint64_t *bits, int32_t j)
{
    bits[j >> 6] |= (uint64_t)1 << (j & 63);
}

/* Where the selection goes: per origin o, its bitmap (bits + o * words), its levels (code + o * M)
 * and how many cells it marked; for a derived point, the cells whose level differs from origin
 * 0's, and which scales that changes (bit i: the set within scale i differs). */
typedef struct {
    uint64_t *bits;
    uint8_t *code;
    Py_ssize_t words, count[MAX_ORIGINS];
    uint64_t dirty[MAX_ORIGINS];
} selection;

/* A derived point's level for cell j (group position q) where origin 0's dot product cannot
 * decide it (`unsure`) or the cell may be the point's nearest: its own dot product, as an
 * independent point's; kept where it differs from origin 0's `level0`. The rare path. */
__attribute__((noinline)) static void derived_cell(const cell_index *ix, const double *ll, const origin *o,
                                                   Py_ssize_t d, int unsure, int may_be_nearest, uint32_t level0,
                                                   Py_ssize_t q, int32_t j, const double *above, const double *below,
                                                   const double *km, Py_ssize_t s, selection *sel, nearest_set *ns,
                                                   Py_ssize_t *settled)
{
    const double own = ix->ux[q] * o->c[0] + ix->uy[q] * o->c[1] + ix->uz[q] * o->c[2];
    if (may_be_nearest)
        nearest_see(&ns[d], own, j);
    if (!unsure)
        return;
    const uint32_t level = own >= below[0] ? own_level(own, o, ll, j, above, below, km, s, settled) : 0;
    if (level != level0) {
        const uint32_t lo = level < level0 ? level : level0, hi = level < level0 ? level0 : level;
        sel->code[d * ix->m + j] = (uint8_t)level;
        set_bit(sel->bits + d * sel->words, j);
        sel->count[d]++;
        sel->dirty[d] |= (((uint64_t)1 << hi) - 1) & ~(((uint64_t)1 << lo) - 1); /* hi <= MAX_SCALES < 64 */
    }
}

/* Everything one selection pass shares: the thresholds with their band (above, below), the
 * scales, where the levels go, the nearest sets, and for origin 0's derived points their merged
 * bands (see derive): HI[l] / LO[l], origin 0's dot at or below / at or above which a cell of
 * origin 0's level l may change level for one of them, NEAR the dot from which a cell may be
 * one's nearest. */
typedef struct {
    const cell_index *ix;
    const double *ll, *km;
    Py_ssize_t s;
    double lowest, above[MAX_SCALES], below[MAX_SCALES + 1];
    selection *sel;
    nearest_set *ns;
    Py_ssize_t settled, derived[MAX_ORIGINS], n_derived;
    double HI[MAX_SCALES + 1], LO[MAX_SCALES + 1], NEAR, floor0;
} pass;

/* One origin's cells of group g: its own levels (the common loop; what it reads is held in locals,
 * since the byte stores to the codes may alias anything behind a pointer). */
__attribute__((always_inline)) static inline void select_group(pass *ps, const origin *o, Py_ssize_t oi,
                                                               Py_ssize_t g)
{
    const cell_index *ix = ps->ix;
    const double *ux = ix->ux, *uy = ix->uy, *uz = ix->uz;
    const int32_t *index_at = ix->index_at;
    const double cx = o->c[0], cy = o->c[1], cz = o->c[2], lowest = ps->lowest;
    const double above0 = ps->above[0], below1 = ps->below[1];
    uint8_t *co = ps->sel->code + oi * ix->m;
    uint64_t *bits = ps->sel->bits + oi * ps->sel->words;
    nearest_set *ns = ps->ns && o->point ? &ps->ns[oi] : NULL;
    Py_ssize_t count = 0;
    for (Py_ssize_t q = ix->start[g], end = ix->start[g + 1]; q < end; q++) {
        const double dot = ux[q] * cx + uy[q] * cy + uz[q] * cz;
        if (!(dot >= lowest))
            continue;
        const int32_t j = index_at[q];
        if (ns)
            nearest_see(ns, dot, j);
        uint32_t level = 1;
        if (!(dot > above0 && dot < below1)) { /* not simply within the largest scale only */
            level = own_level(dot, o, ps->ll, j, ps->above, ps->below, ps->km, ps->s, &ps->settled);
            if (!level)
                continue;
        }
        co[j] = (uint8_t)level;
        set_bit(bits, j);
        count++;
    }
    ps->sel->count[oi] += count;
}

/* Origin 0's cells of group g when points derive from it: its own levels, and for each cell in a
 * derived point's band (or that may be its nearest) that point's own (derived_cell). */
__attribute__((noinline)) static void select_group_widened(pass *ps, const origin *org, Py_ssize_t g)
{
    const cell_index *ix = ps->ix;
    const double *ux = ix->ux, *uy = ix->uy, *uz = ix->uz;
    const int32_t *index_at = ix->index_at;
    const origin *o = &org[0];
    const double cx = o->c[0], cy = o->c[1], cz = o->c[2], lowest = ps->lowest, floor = ps->floor0;
    const double above0 = ps->above[0], below1 = ps->below[1], hi1 = ps->HI[1], lo1 = ps->LO[1];
    uint8_t *co = ps->sel->code;
    uint64_t *bits = ps->sel->bits;
    nearest_set *ns = ps->ns && o->point ? &ps->ns[0] : NULL;
    Py_ssize_t count = 0;
    for (Py_ssize_t q = ix->start[g], end = ix->start[g + 1]; q < end; q++) {
        const double dot = ux[q] * cx + uy[q] * cy + uz[q] * cz;
        if (!(dot >= floor))
            continue;
        const int32_t j = index_at[q];
        uint32_t level = 0;
        int band; /* in a derived point's band next to origin 0's level (LO holds NEAR: see select_origins) */
        if (dot > above0 && dot < below1) { /* within the largest scale only: the common case */
            level = 1;
            band = (dot <= hi1) | (dot >= lo1);
        } else {
            if (dot >= lowest)
                level = own_level(dot, o, ps->ll, j, ps->above, ps->below, ps->km, ps->s, &ps->settled);
            band = (dot <= ps->HI[level]) | (dot >= ps->LO[level]);
        }
        if (ns && dot >= lowest)
            nearest_see(ns, dot, j);
        if (level) {
            co[j] = (uint8_t)level;
            set_bit(bits, j);
            count++;
        }
        /* origin 0's level is the dot product's count of thresholds except within `band` of one,
         * which every derived band holds: the bands next to it decide */
        if (band) {
            for (Py_ssize_t k = 0; k < ps->n_derived; k++) {
                const Py_ssize_t d = ps->derived[k];
                const origin *od = &org[d];
                const int unsure = (level > 0 && dot <= od->hi[level - 1]) || (level < ps->s && dot >= od->lo[level]);
                const int may_be_nearest = ps->ns && dot >= od->near0;
                if (unsure || may_be_nearest)
                    derived_cell(ix, ps->ll, od, d, unsure, may_be_nearest, level, q, j, ps->above, ps->below, ps->km,
                                 ps->s, ps->sel, ps->ns, &ps->settled);
            }
        }
    }
    ps->sel->count[0] += count;
}

/* The selection around every origin in one pass over the cell index: for each group within reach
 * of an origin, each cell's dot product with it gives its level (within the `level` largest
 * scales; thresholds ascending, with `band` around each); cells too close to a threshold to
 * decide that way are settled on the spot by the reference haversine from the origin (`km`:
 * the scales, largest first). A cell's level for origin o goes to its code and bitmap when it
 * is within any scale; a derived point (see derive) keeps only the cells where its level
 * differs from origin 0's. With `ns`, the point origins also track the cells of largest dot
 * product. Returns how many levels haversine settled. */
static Py_ssize_t select_origins(const cell_index *ix, const double *ll, const origin *org, Py_ssize_t n_org,
                                 double theta_max, const double *t, const double *km, Py_ssize_t s, double band,
                                 selection *sel, nearest_set *ns)
{
    pass ps = {.ix = ix, .ll = ll, .km = km, .s = s, .lowest = t[0] - band, .sel = sel, .ns = ns};
    for (Py_ssize_t i = 0; i < s; i++)
        ps.above[i] = t[i] + band, ps.below[i] = t[i] - band;
    ps.below[s] = INFINITY;
    /* origin 0 reaches further for its derived points: their largest scale and their nearest cells */
    double reach0 = theta_max;
    ps.floor0 = ps.lowest, ps.NEAR = INFINITY;
    for (Py_ssize_t l = 0; l <= s; l++)
        ps.HI[l] = -INFINITY, ps.LO[l] = INFINITY;
    for (Py_ssize_t o = 1; o < n_org; o++) {
        if (!org[o].derived)
            continue;
        ps.derived[ps.n_derived++] = o;
        const double near = 2.0 * org[o].delta + NEAR_EPS;
        const double r = (theta_max > near ? theta_max : near) + org[o].delta + DERIVE_EPS;
        reach0 = r > reach0 ? r : reach0;
        for (Py_ssize_t l = 0; l <= s; l++) {
            if (l > 0 && org[o].hi[l - 1] > ps.HI[l])
                ps.HI[l] = org[o].hi[l - 1];
            if (l < s && org[o].lo[l] < ps.LO[l])
                ps.LO[l] = org[o].lo[l];
        }
        if (ns && org[o].near0 < ps.NEAR)
            ps.NEAR = org[o].near0;
    }
    for (Py_ssize_t l = 0; l <= s; l++) /* a cell that may be a derived point's nearest is in a band too */
        ps.LO[l] = ps.NEAR < ps.LO[l] ? ps.NEAR : ps.LO[l];
    ps.floor0 = ps.LO[0] < ps.floor0 ? ps.LO[0] : ps.floor0;
    reach0 = reach0 < PI ? reach0 : PI;
    const double cos_max = cos(theta_max), sin_max = sin(theta_max), cos0 = cos(reach0), sin0 = sin(reach0);
    for (Py_ssize_t o = 0; o < n_org; o++)
        sel->count[o] = 0, sel->dirty[o] = 0;
    for (Py_ssize_t g = 0; g < ix->groups; g++) {
        for (Py_ssize_t o = 0; o < n_org; o++) {
            if (org[o].derived)
                continue;
            if (o == 0 && ps.n_derived) {
                if (cap_reaches(ix->caps + 6 * g, org[0].c, reach0, cos0, sin0))
                    select_group_widened(&ps, org, g);
            } else if (cap_reaches(ix->caps + 6 * g, org[o].c, theta_max, cos_max, sin_max)) {
                select_group(&ps, &org[o], o, g);
            }
        }
    }
    return ps.settled;
}

/* The ascending ids marked in `bits` (cleared on the way) into ids, their codes (cleared) into
 * levels and, with p, their probabilities into vals; returns how many. ids NULL: only clears. */
static Py_ssize_t walk_bits(uint64_t *bits, Py_ssize_t words, uint8_t *code, int32_t *ids, uint8_t *levels,
                            const float *p, float *vals)
{
    Py_ssize_t n = 0;
    for (Py_ssize_t w = 0; w < words; w++) {
        uint64_t word = bits[w];
        if (!word)
            continue;
        bits[w] = 0;
        while (word) {
            const int32_t j = (int32_t)(w * 64 + __builtin_ctzll(word));
            word &= word - 1;
            if (ids) {
                ids[n] = j;
                levels[n] = code[j];
                if (p)
                    vals[n] = p[j];
                n++;
            }
            code[j] = 0;
        }
    }
    return n;
}

/* The sums within each scale of one origin's selection (ascending ids, probabilities and levels;
 * narrowed in place scale by scale: a cell within a scale is within every larger one), as numpy
 * sums them. With derived points, also theirs: at a scale where a derived point's cells are
 * origin 0's, its sum is origin 0's; elsewhere its cells there (origin 0's, less or plus the
 * cells where its level differs: dids, dlev, ascending) are merged in id order into tmp and
 * summed. */
static void scale_sums(Py_ssize_t n, int32_t *ids, float *vals, uint8_t *levs, Py_ssize_t s, const int64_t *slot,
                       double *sums, const origin *org, Py_ssize_t n_org, const selection *sel, int32_t *const *dids,
                       uint8_t *const *dlev, const float *p, float *tmp)
{
    for (Py_ssize_t i = 0; i < s; i++) {
        if (i > 0) { /* keep the cells within scale i */
            Py_ssize_t kept = 0;
            for (Py_ssize_t r = 0; r < n; r++) {
                vals[kept] = vals[r];
                levs[kept] = levs[r];
                if (ids)
                    ids[kept] = ids[r];
                kept += levs[r] > i;
            }
            n = kept;
        }
        const double sum = (double)numpy_sum(vals, n);
        sums[slot[i]] = sum;
        for (Py_ssize_t d = 1; d < n_org && ids; d++) {
            if (!org[d].derived)
                continue;
            if (!(sel->dirty[d] >> i & 1)) {
                sums[d * s + slot[i]] = sum;
                continue;
            }
            const int32_t *di = dids[d];
            const uint8_t *dl = dlev[d];
            const Py_ssize_t nd = sel->count[d];
            Py_ssize_t a = 0, k = 0;
            /* origin 0's run up to each differing cell, then that cell's own level decides */
            for (Py_ssize_t b = 0; b < nd; b++) {
                Py_ssize_t lo = a, hi = n;
                while (lo < hi) { /* the first of origin 0's cells at or after it */
                    const Py_ssize_t mid = lo + (hi - lo) / 2;
                    if (ids[mid] < di[b])
                        lo = mid + 1;
                    else
                        hi = mid;
                }
                memcpy(tmp + k, vals + a, (size_t)(lo - a) * sizeof(float));
                k += lo - a;
                a = lo + (lo < n && ids[lo] == di[b]);
                if (dl[b] > i)
                    tmp[k++] = p[di[b]];
            }
            memcpy(tmp + k, vals + a, (size_t)(n - a) * sizeof(float));
            k += n - a;
            sums[d * s + slot[i]] = (double)numpy_sum(tmp, k);
        }
    }
}

/* pd_select(index..., centres, theta_max, thresholds, km, band, bitmap, codes, near, levels, origin)
 *   -> (n_near, n_settled)
 * The cells within the largest scale of one origin (a row (cell, 0, 0) or (-1, lat, lon), as in
 * pd_mass), ascending ids in near, each with its level; the selection of pd_mass on its own (the
 * cells within a radius of a claim). bitmap and codes are all zero before and after. */
static PyObject *pd_select(PyObject *self, PyObject *args)
{
    Py_buffer units, cell_at, position_of, starts, caps, centres, thresholds, km, bitmap, codes, near, levels, row;
    double theta_max, band;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*dy*y*dw*w*w*w*y*", &units, &cell_at, &position_of, &starts, &caps,
                          &centres, &theta_max, &thresholds, &km, &band, &bitmap, &codes, &near, &levels, &row))
        return NULL;
    PyObject *result = NULL;
    cell_index ix;
    origin org;
    if (!index_of(&ix, &units, &cell_at, &position_of, &starts, &caps, &bitmap, "pd_select") ||
        !thresholds_ok(&thresholds, "pd_select"))
        goto done;
    const Py_ssize_t m = ix.m, s = thresholds.len / (Py_ssize_t)sizeof(double);
    if (centres.len != 16 * m || km.len != thresholds.len || codes.len < m || near.len != 4 * m || levels.len != m ||
        row.len != 24) {
        PyErr_SetString(PyExc_ValueError, "pd_select: buffer sizes do not match");
        goto done;
    }
    const double *ll = (const double *)centres.buf;
    if (!origin_of(&org, (const double *)row.buf, 0, &ix, ll, "pd_select"))
        goto done;
    Py_ssize_t n_near, settled;
    Py_BEGIN_ALLOW_THREADS
    selection sel = {(uint64_t *)bitmap.buf, (uint8_t *)codes.buf, (m + 63) / 64, {0}, {0}};
    settled = select_origins(&ix, ll, &org, 1, theta_max, (const double *)thresholds.buf, (const double *)km.buf, s,
                             band, &sel, NULL);
    n_near = walk_bits(sel.bits, sel.words, sel.code, (int32_t *)near.buf, (uint8_t *)levels.buf, NULL, NULL);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nn", n_near, settled);
done:
    RELEASE(&units, &cell_at, &position_of, &starts, &caps, &centres, &thresholds, &km, &bitmap, &codes, &near,
            &levels, &row);
    return result;
}

/* pd_mass(index..., centres, theta_max, thresholds, km, band, bitmap, codes, probs, order, scratch, origins,
 *         out, nearest, nearest_km, rank) -> the cells within origin 0's largest scale
 * PD around several origins in one pass over the cells: origins [P, 3] float64 rows (cell, 0, 0)
 * for a cell's centre or (-1, lat, lon) for a point; out [P, s] the masses. Each cell's dot
 * product with every origin whose reach holds its group gives its level per origin (the
 * boundary settled by haversine on the spot); a point near origin 0 reads its levels off origin
 * 0's dot products where they decide them (see derive). Each origin's bitmap is walked in
 * ascending id order and its selection summed as numpy sums (pairwise, 8192-value chunks),
 * narrowed scale by scale: for every origin the same bits as the reference's
 * probs[d <= s].sum(). For a point, also the cell nearest it (nearest, nearest_km) and that
 * cell's rank by probability; -1, NaN, 0 for a cell. bitmap (P bitmaps of M bits) and codes
 * (uint8, >= P * M) are all zero before and after. */
static PyObject *pd_mass(PyObject *self, PyObject *args)
{
    Py_buffer units, cell_at, position_of, starts, caps, centres, thresholds, km, bitmap, codes, probs, order, scratch,
        origins, out, nearest, nearest_km, rank;
    double theta_max, band;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*dy*y*dw*w*y*y*w*y*w*w*w*w*", &units, &cell_at, &position_of, &starts,
                          &caps, &centres, &theta_max, &thresholds, &km, &band, &bitmap, &codes, &probs, &order,
                          &scratch, &origins, &out, &nearest, &nearest_km, &rank))
        return NULL;
    PyObject *result = NULL;
    cell_index ix;
    const Py_ssize_t s = thresholds.len / (Py_ssize_t)sizeof(double), n_org = origins.len / 24;
    Py_ssize_t n_first = 0;
    int no_memory = 0;
    if (!index_of(&ix, &units, &cell_at, &position_of, &starts, &caps, &bitmap, "pd_mass") ||
        !thresholds_ok(&thresholds, "pd_mass"))
        goto done;
    const Py_ssize_t m = ix.m;
    if (n_org < 1 || n_org > MAX_ORIGINS || origins.len % 24) {
        PyErr_Format(PyExc_ValueError, "pd_mass: 1 to %d origins, got %zd", MAX_ORIGINS, n_org);
        goto done;
    }
    if (centres.len != 16 * m || km.len != thresholds.len || codes.len < n_org * m || probs.len != 4 * m ||
        out.len != 8 * s * n_org || nearest.len != 8 * n_org || nearest_km.len != 8 * n_org ||
        rank.len != 8 * n_org || bitmap.len < n_org * ((m + 63) / 64) * 8) {
        PyErr_SetString(PyExc_ValueError, "pd_mass: buffer sizes do not match");
        goto done;
    }
    if (!order_ok(&order, s, "pd_mass"))
        goto done;
    const double *ll = (const double *)centres.buf, *row = (const double *)origins.buf;
    origin org[MAX_ORIGINS];
    for (Py_ssize_t o = 0; o < n_org; o++)
        if (!origin_of(&org[o], row + 3 * o, o, &ix, ll, "pd_mass"))
            goto done;
    Py_BEGIN_ALLOW_THREADS
    const double *t = (const double *)thresholds.buf, *kms = (const double *)km.buf;
    const float *p = (const float *)probs.buf;
    const int64_t *slot = (const int64_t *)order.buf;
    const double lowest = t[0] - band;
    selection sel = {(uint64_t *)bitmap.buf, (uint8_t *)codes.buf, (m + 63) / 64, {0}, {0}};
    nearest_set ns[MAX_ORIGINS];
    for (Py_ssize_t o = 0; o < n_org; o++)
        ns[o].best = -INFINITY, ns[o].n = ns[o].overflow = 0;
    for (Py_ssize_t o = 1; o < n_org; o++)
        derive(&org[o], &org[0], theta_max, t, kms, s, band);
    select_origins(&ix, ll, org, n_org, theta_max, t, kms, s, band, &sel, ns);
    /* each origin's cells in ascending ids (its bitmap walked): ids, levels, probabilities; a
     * derived point's only where its level differs from origin 0's (ids and levels) */
    Py_ssize_t total = 0, most_derived = 0, with_vals = 0;
    int derived = 0;
    for (Py_ssize_t o = 0; o < n_org; o++) {
        total += sel.count[o];
        if (org[o].derived) {
            derived = 1;
            most_derived = sel.count[o] > most_derived ? sel.count[o] : most_derived;
        } else {
            with_vals += sel.count[o];
        }
    }
    n_first = sel.count[0];
    const size_t n_tmp = derived ? (size_t)(sel.count[0] + most_derived) : 0;
    const size_t need = (size_t)total * 5 + ((size_t)with_vals + n_tmp) * 4; /* id 4 + level 1; probability 4 */
    void *own = NULL;
    int32_t *ids = (int32_t *)scratch.buf;
    if (need > (size_t)scratch.len) {
        own = PyMem_RawMalloc(need ? need : 1);
        no_memory = own == NULL;
        ids = (int32_t *)own;
    }
    float *vals = ids ? (float *)(ids + total) : NULL, *tmp = vals ? vals + with_vals : NULL;
    uint8_t *levs = tmp ? (uint8_t *)(tmp + n_tmp) : NULL;
    int32_t *o_ids[MAX_ORIGINS];
    float *o_vals[MAX_ORIGINS];
    uint8_t *o_levs[MAX_ORIGINS];
    for (Py_ssize_t o = 0, at = 0, at_vals = 0; o < n_org; o++) {
        o_ids[o] = ids ? ids + at : NULL;
        o_levs[o] = levs ? levs + at : NULL;
        o_vals[o] = vals && !org[o].derived ? vals + at_vals : NULL;
        walk_bits(sel.bits + o * sel.words, sel.words, sel.code + o * m, o_ids[o], o_levs[o], o_vals[o] ? p : NULL,
                  o_vals[o]);
        at += sel.count[o];
        at_vals += org[o].derived ? 0 : sel.count[o];
    }
    double *sums = (double *)out.buf;
    for (Py_ssize_t o = 0; o < n_org && ids; o++)
        if (!org[o].derived)
            scale_sums(sel.count[o], o == 0 && derived ? o_ids[0] : NULL, o_vals[o], o_levs[o], s, slot, sums + o * s,
                       org, o == 0 ? n_org : 0, &sel, o_ids, o_levs, p, tmp);
    double *dist = (double *)nearest_km.buf;
    int64_t *best = (int64_t *)nearest.buf, *ranks = (int64_t *)rank.buf;
    for (Py_ssize_t o = 0; o < n_org && !no_memory; o++) {
        best[o] = -1, dist[o] = NAN, ranks[o] = 0;
        if (org[o].point) {
            /* the cells offered hold the nearest (those within the largest scale; for a derived point those
             * within `seen` of it), unless none is or its near-ties reach below them */
            if (ns[o].n == 0 || ns[o].best - TIE_DOT < (org[o].derived ? org[o].seen : lowest))
                nearest_everywhere(&ix, org[o].c, &ns[o]);
            best[o] = nearest_settle(&ix, ll, org[o].c, org[o].lat, org[o].lon, &ns[o], &dist[o]);
            ranks[o] = rank_of(p, m, best[o]);
        }
    }
    PyMem_RawFree(own);
    Py_END_ALLOW_THREADS
    if (no_memory)
        PyErr_NoMemory();
    else
        result = PyLong_FromSsize_t(n_first);
done:
    RELEASE(&units, &cell_at, &position_of, &starts, &caps, &centres, &thresholds, &km, &bitmap, &codes, &probs,
            &order, &scratch, &origins, &out, &nearest, &nearest_km, &rank);
    return result;
}

/* ------------------------------------------------------------------ geometry */

/* The one haversine of the service (geo.haversine_km calls it through `haversine`): the
 * reference's formula, operation for operation; `a` is clipped at 1 so antipodal rounding gives
 * 20015 km instead of NaN. */
static double haversine_km(double lat1, double lon1, double lat2, double lon2)
{
    lat1 *= PI / 180.0;
    lon1 *= PI / 180.0;
    lat2 *= PI / 180.0;
    lon2 *= PI / 180.0;
    double dlon = lon2 - lon1, dlat = lat2 - lat1;
    double s1 = sin(dlat / 2.0), s2 = sin(dlon / 2.0);
    double a = s1 * s1 + cos(lat1) * cos(lat2) * (s2 * s2);
    return EARTH_RADIUS_KM * (2 * asin(sqrt(a > 1.0 ? 1.0 : a)));
}

/* (lat, lon) degrees -> unit vector, the reference's latlon_to_cart (geo.latlon_to_unit). */
static void to_unit(double lat_deg, double lon_deg, double *xyz)
{
    double la = lat_deg / 180 * PI, lo = lon_deg / 180 * PI;
    xyz[0] = cos(la) * cos(lo);
    xyz[1] = cos(la) * sin(lo);
    xyz[2] = sin(la);
}

/* haversine(lat1, lon1, lat2, lon2, out): elementwise over equal-length float64 buffers. */
static PyObject *haversine(PyObject *self, PyObject *args)
{
    Py_buffer a, b, c, d, out;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*", &a, &b, &c, &d, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = out.len / 8;
    if (out.len % 8 || a.len != out.len || b.len != out.len || c.len != out.len || d.len != out.len) {
        PyErr_SetString(PyExc_ValueError, "haversine: four coordinate buffers and the output must hold n doubles");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const double *lat1 = a.buf, *lon1 = b.buf, *lat2 = c.buf, *lon2 = d.buf;
    double *km = out.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        km[i] = haversine_km(lat1[i], lon1[i], lat2[i], lon2[i]);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    RELEASE(&a, &b, &c, &d, &out);
    return result;
}

/* distance_km(lat1, lon1, lat2, lon2) -> km: one pair, without buffers. */
static PyObject *distance_km(PyObject *self, PyObject *args)
{
    double lat1, lon1, lat2, lon2;
    if (!PyArg_ParseTuple(args, "dddd", &lat1, &lon1, &lat2, &lon2))
        return NULL;
    return PyFloat_FromDouble(haversine_km(lat1, lon1, lat2, lon2));
}

/* latlon_to_unit(latlon [n, 2] float64, out [n, 3] float64) */
static PyObject *latlon_to_unit(PyObject *self, PyObject *args)
{
    Py_buffer latlon, out;
    if (!PyArg_ParseTuple(args, "y*w*", &latlon, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = latlon.len / 16;
    if (latlon.len % 16 || out.len != n * 24) {
        PyErr_SetString(PyExc_ValueError, "latlon_to_unit: [n, 2] in, [n, 3] out, float64");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const double *ll = latlon.buf;
    double *xyz = out.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        to_unit(ll[2 * i], ll[2 * i + 1], xyz + 3 * i);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    RELEASE(&latlon, &out);
    return result;
}

/* ------------------------------------------------------------------ SwC clusters */

/* The candidates' clusters and the SwC prediction, as method.py documents it:
 * DBSCAN(min_samples=1) = connected components of "haversine <= eps", labelled in order of
 * their first member (scikit-learn's numbering); the largest cluster, the lowest label on a
 * tie; the mean of its members' unit vectors (summed in candidate order) mapped back without
 * renormalising. ``ll`` is k (lat, lon) pairs; ``work`` holds 2k Py_ssize_t. No Python calls. */
static void cluster_mean(const double *ll, Py_ssize_t k, double eps_km, int64_t *label, Py_ssize_t *work,
                         Py_ssize_t *chosen_out, Py_ssize_t *members_out, double *lat_out, double *lon_out)
{
    Py_ssize_t *stack = work, *size = work + k, clusters = 0, chosen = 0;
    for (Py_ssize_t i = 0; i < k; i++)
        label[i] = -1;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (label[i] >= 0)
            continue;
        Py_ssize_t top = 0;
        label[i] = clusters;
        size[clusters] = 1;
        stack[top++] = i;
        while (top) {
            Py_ssize_t u = stack[--top];
            for (Py_ssize_t v = 0; v < k; v++) {
                if (label[v] < 0 && haversine_km(ll[2 * u], ll[2 * u + 1], ll[2 * v], ll[2 * v + 1]) <= eps_km) {
                    label[v] = clusters;
                    size[clusters]++;
                    stack[top++] = v;
                }
            }
        }
        clusters++;
    }
    for (Py_ssize_t c = 1; c < clusters; c++)
        if (size[c] > size[chosen])
            chosen = c;
    double x = 0.0, y = 0.0, z = 0.0;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (label[i] != chosen)
            continue;
        double u[3];
        to_unit(ll[2 * i], ll[2 * i + 1], u);
        x += u[0];
        y += u[1];
        z += u[2];
    }
    x /= (double)size[chosen];
    y /= (double)size[chosen];
    z /= (double)size[chosen];
    *chosen_out = chosen;
    *members_out = size[chosen];
    *lat_out = asin(z > 1.0 ? 1.0 : (z < -1.0 ? -1.0 : z)) / PI * 180;
    *lon_out = atan2(y, x) / PI * 180;
}

/* ------------------------------------------------------------------ SwC, whole */

/* Is (s, r) ranked before (t, q)? Higher similarity first, NaN last, lower row on ties. */
static int ranks_before(float s, Py_ssize_t r, float t, Py_ssize_t q)
{
    if (isnan(s) || isnan(t))
        return isnan(s) ? (isnan(t) && r < q) : 1;
    return s > t || (s == t && r < q);
}

/* The k best rows in rank order: one pass keeping a sorted list (rows arrive in increasing
 * order, so an equal similarity never displaces an earlier row). */
static void top_k(const float *sims, Py_ssize_t n, Py_ssize_t k, int64_t *order, float *best)
{
    Py_ssize_t count = 0;
    for (Py_ssize_t r = 0; r < n; r++) {
        const float s = sims[r];
        if (count == k && !ranks_before(s, r, best[k - 1], (Py_ssize_t)order[k - 1]))
            continue;
        Py_ssize_t lo = 0, hi = count < k ? count : k - 1; /* first position ranked after (s, r) */
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            if (ranks_before((float)best[mid], (Py_ssize_t)order[mid], s, r))
                lo = mid + 1;
            else
                hi = mid;
        }
        Py_ssize_t last = count < k ? count : k - 1;
        memmove(order + lo + 1, order + lo, (size_t)(last - lo) * sizeof *order);
        memmove(best + lo + 1, best + lo, (size_t)(last - lo) * sizeof *best);
        order[lo] = r;
        best[lo] = s;
        if (count < k)
            count++;
    }
}

/* SwC in one call: similarities of the cell's rows, the top k (stable), their labels, clusters
 * and the mean. Outputs: order (int64 k), sims (float32 k), clusters (int64 k). */
static PyObject *swc(PyObject *self, PyObject *args)
{
    Py_buffer rows, labels, query, order, sims, clusters;
    int half, simd = 1;
    double eps_km;
    if (!PyArg_ParseTuple(args, "y*py*y*dw*w*w*|p", &rows, &half, &labels, &query, &eps_km, &order, &sims, &clusters,
                          &simd))
        return NULL;
    PyObject *result = NULL;
    float *all = NULL;
    double *cand = NULL;
    Py_ssize_t *work = NULL;
    Py_ssize_t item = half ? 2 : 4, d = query.len / 4, n = labels.len / 16, k = order.len / 8;
    if (query.len % 4 || d == 0 || labels.len % 16 || n < 1 || rows.len != n * d * item) {
        PyErr_Format(PyExc_ValueError, "swc: %zd bytes of rows and %zd of labels do not make rows of %zd values",
                     rows.len, labels.len, d);
        goto done;
    }
    if (order.len % 8 || k < 1 || k > n || sims.len != k * 4 || clusters.len != k * 8) {
        PyErr_Format(PyExc_ValueError, "swc: outputs must hold 1 to %zd candidates", n);
        goto done;
    }
    all = PyMem_Malloc((size_t)n * sizeof *all);
    cand = PyMem_Malloc((size_t)k * 2 * sizeof *cand);
    work = PyMem_Malloc((size_t)k * 2 * sizeof *work);
    if (all == NULL || cand == NULL || work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t chosen, members;
    double lat, lon;
    Py_BEGIN_ALLOW_THREADS
#if VISLOC_X86
    if (simd && use_simd)
        dot_rows_avx2(rows.buf, half, n, d, (const float *)query.buf, all);
    else
#endif
        dot_rows_portable(rows.buf, half, n, d, (const float *)query.buf, all);
    int64_t *idx = (int64_t *)order.buf;
    top_k(all, n, k, idx, (float *)sims.buf);
    const double *ll = (const double *)labels.buf;
    for (Py_ssize_t i = 0; i < k; i++) {
        cand[2 * i] = ll[2 * idx[i]];
        cand[2 * i + 1] = ll[2 * idx[i] + 1];
    }
    cluster_mean(cand, k, eps_km, (int64_t *)clusters.buf, work, &chosen, &members, &lat, &lon);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nndd", chosen, members, lat, lon);
done:
    PyMem_Free(all);
    PyMem_Free(cand);
    PyMem_Free(work);
    RELEASE(&rows, &labels, &query, &order, &sims, &clusters);
    return result;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"pd_select", pd_select, METH_VARARGS,
     "pd_select(index..., centres, theta_max, thresholds, km, band, bitmap, codes, near, levels, origin) -> "
     "(n_near, n_settled)"},
    {"pd_mass", pd_mass, METH_VARARGS,
     "pd_mass(index..., centres, theta_max, thresholds, km, band, bitmap, codes, probs, order, scratch, origins, out, "
     "nearest, nearest_km, rank) -> cells within origin 0's largest scale"},
    {"haversine", haversine, METH_VARARGS, "haversine(lat1, lon1, lat2, lon2, out): km, elementwise, float64"},
    {"distance_km", distance_km, METH_VARARGS, "distance_km(lat1, lon1, lat2, lon2) -> km: haversine for one pair"},
    {"latlon_to_unit", latlon_to_unit, METH_VARARGS, "latlon_to_unit(latlon [n, 2], out [n, 3]): unit vectors"},
    {"swc", swc, METH_VARARGS,
     "swc(rows, is_half, labels_f64, query_f32, eps_km, order_i64, sims_f32, clusters_i64, simd=True) -> (chosen, members, lat, lon)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "SwC and PD inner loops.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void)
{
#if VISLOC_X86
    __builtin_cpu_init();
    use_simd = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddStringConstant(m, "SIMD", use_simd ? "avx2+fma+f16c" : "portable") < 0 ||
        PyModule_AddIntConstant(m, "LANES", LANES) < 0 || PyModule_AddIntConstant(m, "MAX_SCALES", MAX_SCALES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_ORIGINS", MAX_ORIGINS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
