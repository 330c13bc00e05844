/* Crop index of a JPEG, and the Huffman decoder that uses it: see _jpeg_index.h.
 *
 * The decoder replaces libjpeg's decode_mcu for single-scan baseline Huffman files and reads the data straight
 * from memory (no suspension): a 64-bit bit buffer refilled eight bytes at a time where no 0xFF byte intervenes,
 * and 10-bit lookup tables that decode a whole symbol with its value bits in one step when both fit (a DC
 * difference; an AC zero run and coefficient, sixteen zeros or the end of a block). docs/PERFORMANCE.md
 * compares its speed with libjpeg-turbo's Huffman decoder. What it adds is the index: a position in the bit
 * stream plus the DC predictors is all the state a baseline Huffman decoder has, so decoding can start at any
 * indexed MCU. That also lets it decode two rows of a crop at once, from two positions in the stream: one
 * reader's symbols are a chain of dependent steps, and the CPU overlaps two independent chains.
 *
 * Index segment (APP9), after the marker and its big-endian length:
 *   "DMJXIDX1"  u16 step  u16 mcus_x  u16 mcus_y  u8 ncomp  u8 entry_bytes  u32 scan_bytes     (little-endian)
 *   then mcus_y * ceil(mcus_x / step) entries: u32 (byte offset in the scan | bit << 29), ncomp x i16 DC.
 * The byte offset counts from the first byte of entropy-coded data and points at the byte holding the entry's
 * first bit (bit 0 = most significant); scan_bytes is the file's size from there to its end, which ties the
 * index to the data it describes.
 */
#include "_jpeg_index.h"

#include <setjmp.h>
#include <stdlib.h>
#include <string.h>

#include <jerror.h>
#include <jpegint.h> /* struct jpeg_entropy_decoder (decode_mcu is replaced), struct jpeg_input_controller */

#if JPEG_LIB_VERSION >= 70
#define MIN_DCT_SIZE(cinfo) ((cinfo)->min_DCT_h_scaled_size)
#define MIN_DCT_V_SIZE(cinfo) ((cinfo)->min_DCT_v_scaled_size)
#else
#define MIN_DCT_SIZE(cinfo) ((cinfo)->min_DCT_scaled_size)
#define MIN_DCT_V_SIZE(cinfo) ((cinfo)->min_DCT_scaled_size)
#endif

#define INDEX_MARKER (JPEG_APP0 + 9)
#define INDEX_MAGIC "DMJXIDX1"
#define INDEX_HEADER 20 /* magic, step, mcus_x, mcus_y, ncomp, entry_bytes, scan_bytes */
#define INDEX_MAX_PAYLOAD (65535 - 2)

/* ------------------------------------------------------------------------------------------------------ */
/* Huffman tables and bit reader                                                                            */

#ifndef FAST_BITS
#define FAST_BITS 10
#endif
#define FAST_SIZE (1 << FAST_BITS)

/* A fast-table entry decodes, from the next FAST_BITS bits, a whole symbol with its value bits when both fit:
 *   bits 0-4 bits used (code and value), bits 5-11 zigzag positions to advance before storing (an AC symbol's
 *   zero run; 15 for sixteen zeros, which then stores a harmless 0; 64 for end of block, which leaves the
 *   block), bits 16-31 the signed value (DC: the difference to the predictor).
 * FAST_SLOW marks everything else (a longer code, or value bits that do not fit), decoded by the slow path. */
#define FAST_SLOW 0x8000
#define FAST_USED(f) ((f) & 31)
#define FAST_RUN(f) (((f) >> 5) & 127)
#define FAST_VALUE(f) ((f) >> 16)
#define END_OF_BLOCK_RUN 64

typedef struct {
    int32_t fast[FAST_SIZE];  /* see above */
    uint16_t look[FAST_SIZE]; /* (length << 8) | symbol for codes of at most FAST_BITS bits, else 0 */
    int32_t maxcode[18];      /* largest code of each length, -1 if none; [17] is a sentinel */
    int32_t valoffset[17];    /* a code of length l is symbol values[code + valoffset[l]] */
    uint8_t values[256];
    uint8_t key[17 + 256]; /* the libjpeg table (bits, huffval) these were built from */
    int built;             /* 0: not built, 1: DC table, 2: AC table */
} huff_table;

/* A bit reader over entropy-coded data in memory, copied into locals while MCUs are decoded (stores into the
 * coefficient blocks would otherwise force it back to memory after every coefficient). */
typedef struct {
    const uint8_t *p, *end; /* next byte to read, end of the data in memory */
    uint64_t bits;          /* bit buffer: the next bit is bit 63 */
    int nbits;              /* bits in the buffer, zero padding included */
    int padding;            /* zero bits at the buffer's tail that are not data (past a marker) */
    int at_marker;          /* the data ran into a marker (or its end): refills add zero bits */
} bit_reader;

struct dm_entropy {
    const uint8_t *scan;  /* first byte of entropy-coded data */
    bit_reader reader;    /* where decoding stands (with the index: at MCU `position`) */
    unsigned restarts_to_go, next_restart;
    int last_dc[MAX_COMPS_IN_SCAN];
    const huff_table *dc[MAX_COMPS_IN_SCAN], *ac[MAX_COMPS_IN_SCAN];
    /* Index use: the MCU the bit reader stands at, the next MCU libjpeg will ask for, the columns it uses. */
    const dm_index *index; /* &index_copy, or NULL: no index */
    dm_index index_copy;
    long position, row, col;
    int col0, col1;
    /* Row pairs (index use): two rows of the crop decoded together, see decode_mcu. */
    long last_row;        /* the last MCU row libjpeg will ask for with data */
    long pair_row;        /* the pair's first row, -1 if none */
    bit_reader second;    /* the pair's second row: its bit reader and DC predictors */
    int second_dc[MAX_COMPS_IN_SCAN];
    JCOEF *ahead;         /* its coefficients, MCU after MCU from column col0 */
    size_t ahead_bytes;
    huff_table tables[2 * NUM_HUFF_TBLS]; /* DC tables, then AC tables, by libjpeg table number */
    JCOEF discard[DCTSIZE2];              /* coefficients nobody asked for */
};

/* Zigzag position -> natural (row-major) index. Positions past 63 (an end of block's advance, or a corrupt
 * run) land on 63: still zero when the block ends, and inside the block when the data is corrupt. */
static const uint8_t natural_order[DCTSIZE2 + END_OF_BLOCK_RUN + 16] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,  12, 19, 26, 33, 40, 48,
    41, 34, 27, 20, 13, 6,  7,  14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23,
    30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
    [DCTSIZE2 ... DCTSIZE2 + END_OF_BLOCK_RUN + 15] = 63};

/* The value of s bits v read from the stream (JPEG's "extend"): the upper half is positive, the lower half
 * stands for negative values. */
static inline int extend(int v, int s) { return v < (1 << (s - 1)) ? v - (1 << s) + 1 : v; }

/* Lookup tables of one libjpeg Huffman table. Rebuilt only when the table differs from the one they were built
 * from (files written by one encoder share their tables). Returns 0 for a table no valid code fits. */
static int build_table(huff_table *T, const JHUFF_TBL *h, int ac) {
    uint8_t key[17 + 256];
    memcpy(key, h->bits, 17);
    memcpy(key + 17, h->huffval, 256);
    if (T->built == 1 + ac && memcmp(key, T->key, sizeof key) == 0) return 1;
    T->built = 0;
    memcpy(T->key, key, sizeof key);
    memcpy(T->values, h->huffval, 256);
    memset(T->look, 0, sizeof T->look);
    for (int i = 0; i < FAST_SIZE; i++) T->fast[i] = FAST_SLOW;
    int32_t code = 0, k = 0;
    for (int l = 1; l <= 16; l++) {
        int n = h->bits[l];
        if (k + n > 256 || code + n > (1 << l)) return 0; /* too many symbols, or more codes than fit in l bits */
        T->valoffset[l] = k - code;
        for (int i = 0; i < n; i++, k++, code++) {
            if (l > FAST_BITS) continue;
            int sym = h->huffval[k], shift = FAST_BITS - l;
            int run = ac ? sym >> 4 : 0, size = ac ? sym & 15 : sym;
            if (ac && size == 0) run = run == 15 ? 15 : END_OF_BLOCK_RUN;
            for (int j = 0; j < (1 << shift); j++) {
                int idx = (code << shift) | j;
                T->look[idx] = (uint16_t)((l << 8) | sym);
                if (size <= 15 && l + size <= FAST_BITS) {
                    int v = size ? extend(j >> (shift - size), size) : 0;
                    T->fast[idx] = (int32_t)((uint32_t)v << 16) | run << 5 | (l + size);
                }
            }
        }
        T->maxcode[l] = n ? code - 1 : -1;
        code <<= 1;
    }
    T->maxcode[17] = INT32_MAX;
    T->built = 1 + ac;
    return 1;
}

/* True if one of the eight bytes of w is 0xFF. */
static inline int has_ff_byte(uint64_t w) {
    uint64_t x = ~w;
    return ((x - 0x0101010101010101ull) & w & 0x8080808080808080ull) != 0;
}

/* Top the bit buffer up to at least 57 bits. At a marker or the end of the data it pads with zero bits
 * (counted, so that using them can be reported as corrupt data). */
static inline __attribute__((always_inline)) void refill(bit_reader *B) {
    if (!B->at_marker && B->end - B->p >= 8) {
        uint64_t w;
        memcpy(&w, B->p, 8);
        if (__builtin_expect(!has_ff_byte(w), 1)) {
            w = __builtin_bswap64(w);
            int k = (64 - B->nbits) >> 3; /* whole bytes that fit: 1..8 */
            B->bits |= (w >> (64 - 8 * k)) << (64 - 8 * k - B->nbits);
            B->p += k;
            B->nbits += 8 * k;
            return;
        }
    }
    while (B->nbits <= 56) {
        if (B->at_marker || B->p >= B->end || (B->p[0] == 0xFF && (B->p + 1 >= B->end || B->p[1] != 0))) {
            B->at_marker = 1;
            B->padding += 64 - B->nbits;
            B->nbits = 64;
            return;
        }
        uint64_t c = B->p[0];
        B->p += c == 0xFF ? 2 : 1; /* 0xFF 0x00 stands for a 0xFF data byte */
        B->bits |= c << (56 - B->nbits);
        B->nbits += 8;
    }
}

/* Symbol of a code longer than the lookup (or -1 if no code matches); *length receives its length. */
static int decode_long_code(const huff_table *T, uint64_t bits, int *length) {
    for (int l = FAST_BITS + 1; l <= 16; l++) {
        int32_t code = (int32_t)(bits >> (64 - l));
        if (code <= T->maxcode[l]) {
            *length = l;
            return T->values[(code + T->valoffset[l]) & 255];
        }
    }
    return -1;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Decoding MCUs                                                                                            */

#define BAD_CODE()                                            \
    do {                                                      \
        WARNMS(cinfo, JWRN_HUFF_BAD_CODE); /* longjmps out */ \
        return FALSE;                                         \
    } while (0)

/* Take the next code's symbol: through the lookup, or bit by bit for long codes. */
#define SYMBOL(T, bits, length, symbol)                                    \
    do {                                                                   \
        unsigned e_ = (T)->look[(bits) >> (64 - FAST_BITS)];               \
        if (e_) {                                                          \
            length = (int)(e_ >> 8);                                       \
            symbol = (int)(e_ & 255);                                      \
        } else if ((symbol = decode_long_code((T), (bits), &length)) < 0) { \
            BAD_CODE();                                                    \
        }                                                                  \
    } while (0)

/* The next block's DC coefficient: the difference to the component's predictor *last_dc, which it updates. */
static inline __attribute__((always_inline)) boolean decode_dc(j_decompress_ptr cinfo, bit_reader *B,
                                                                const huff_table *dc, int *last_dc, JCOEF *block) {
    if (B->nbits < 32) refill(B);
    const int32_t f = dc->fast[B->bits >> (64 - FAST_BITS)];
    int diff;
    if (__builtin_expect(!(f & FAST_SLOW), 1)) {
        diff = FAST_VALUE(f);
        B->bits <<= FAST_USED(f);
        B->nbits -= FAST_USED(f);
    } else {
        int length, s;
        SYMBOL(dc, B->bits, length, s);
        if (s > 15) BAD_CODE();
        B->bits <<= length;
        diff = s ? extend((int)(B->bits >> (64 - s)), s) : 0;
        B->bits <<= s;
        B->nbits -= length + s;
    }
    /* Summed modulo 2^32 (unsigned: corrupt data can push the sum past INT_MAX, and signed overflow is undefined);
     * the coefficient keeps the low 16 bits either way, as libjpeg's does. */
    *last_dc = (int)((unsigned)*last_dc + (unsigned)diff);
    block[0] = (JCOEF)*last_dc;
    return TRUE;
}

/* One AC symbol of a block whose next coefficient is at zigzag position *k; *k moves past what it decodes (to
 * DCTSIZE2 or beyond at the end of the block). */
static inline __attribute__((always_inline)) boolean decode_ac(j_decompress_ptr cinfo, bit_reader *B,
                                                                const huff_table *ac, int *k, JCOEF *block) {
    if (B->nbits < 32) refill(B);
    const int32_t f = ac->fast[B->bits >> (64 - FAST_BITS)];
    if (__builtin_expect(!(f & FAST_SLOW), 1)) { /* symbol and value in one lookup */
        *k += FAST_RUN(f);
        block[natural_order[*k]] = (JCOEF)FAST_VALUE(f);
        B->bits <<= FAST_USED(f);
        B->nbits -= FAST_USED(f);
        ++*k;
        return TRUE;
    }
    int length, s;
    SYMBOL(ac, B->bits, length, s);
    const int run = s >> 4;
    s &= 15;
    B->bits <<= length;
    if (s) {
        *k += run;
        block[natural_order[*k]] = (JCOEF)extend((int)(B->bits >> (64 - s)), s);
        B->bits <<= s;
    } else if (run == 15) {
        *k += 15; /* sixteen zeros */
    } else {
        *k = DCTSIZE2; /* end of block */
    }
    B->nbits -= length + s;
    ++*k;
    return TRUE;
}

/* Decoded bits that were not there: the data ended early (or ran into a marker). */
static boolean check_overrun(j_decompress_ptr cinfo, bit_reader *B) {
    if (B->nbits >= B->padding) return TRUE;
    B->padding = 0;
    WARNMS(cinfo, JWRN_HIT_MARKER); /* longjmps out */
    return FALSE;
}

/* One MCU's coefficients (not dequantised) from reader R (DC predictors last_dc) into MCU_data, which libjpeg
 * has zeroed; into a scratch block (dropped) with MCU_data NULL. */
static boolean decode_blocks(j_decompress_ptr cinfo, dm_entropy *E, bit_reader *R, int *last_dc,
                             JBLOCKROW *MCU_data) {
    bit_reader B = *R;
    for (int b = 0; b < cinfo->blocks_in_MCU; b++) {
        JCOEF *block = MCU_data ? MCU_data[b][0] : E->discard;
        const int ci = cinfo->MCU_membership[b];
        const huff_table *ac = E->ac[ci];
        if (!decode_dc(cinfo, &B, E->dc[ci], &last_dc[ci], block)) return FALSE;
        for (int k = 1; k < DCTSIZE2;)
            if (!decode_ac(cinfo, &B, ac, &k, block)) return FALSE;
    }
    *R = B;
    return check_overrun(cinfo, R);
}

/* The same MCU column of a row pair's two rows, in lockstep: the first row's (E->reader) into MCU_data, the
 * second's (E->second) into `ahead` (DCTSIZE2 coefficients per block, zeroed here); NULL drops either. Each
 * reader's symbols form one chain of dependent steps (bit buffer -> table lookup -> shift); the two chains are
 * independent, so the CPU overlaps them (docs/PERFORMANCE.md: 1.05x on the crops, copies included). */
static boolean decode_blocks_pair(j_decompress_ptr cinfo, dm_entropy *E, JBLOCKROW *MCU_data, JCOEF *ahead) {
    bit_reader A = E->reader, B = E->second;
    if (ahead) memset(ahead, 0, (size_t)cinfo->blocks_in_MCU * DCTSIZE2 * sizeof(JCOEF));
    for (int b = 0; b < cinfo->blocks_in_MCU; b++) {
        JCOEF *first = MCU_data ? MCU_data[b][0] : E->discard;
        JCOEF *second = ahead ? ahead + (size_t)b * DCTSIZE2 : E->discard;
        const int ci = cinfo->MCU_membership[b];
        const huff_table *dc = E->dc[ci], *ac = E->ac[ci];
        if (!decode_dc(cinfo, &A, dc, &E->last_dc[ci], first) || !decode_dc(cinfo, &B, dc, &E->second_dc[ci], second))
            return FALSE;
        int ka = 1, kb = 1;
        while (ka < DCTSIZE2 && kb < DCTSIZE2)
            if (!decode_ac(cinfo, &A, ac, &ka, first) || !decode_ac(cinfo, &B, ac, &kb, second)) return FALSE;
        while (ka < DCTSIZE2)
            if (!decode_ac(cinfo, &A, ac, &ka, first)) return FALSE;
        while (kb < DCTSIZE2)
            if (!decode_ac(cinfo, &B, ac, &kb, second)) return FALSE;
    }
    E->reader = A;
    E->second = B;
    return check_overrun(cinfo, &E->reader) && check_overrun(cinfo, &E->second);
}

static void restart(j_decompress_ptr cinfo, dm_entropy *E) {
    /* What is left of the segment's last byte is padding; its restart marker comes next (after optional fill
     * bytes 0xFF). */
    const uint8_t *p = E->reader.p, *end = E->reader.end;
    while (end - p >= 2 && p[0] == 0xFF && p[1] == 0xFF) p++;
    if (end - p < 2 || p[0] != 0xFF || p[1] != JPEG_RST0 + E->next_restart) WARNMS(cinfo, JWRN_MUST_RESYNC);
    E->reader = (bit_reader){p + 2, end, 0, 0, 0, 0};
    for (int ci = 0; ci < MAX_COMPS_IN_SCAN; ci++) E->last_dc[ci] = 0;
    E->restarts_to_go = cinfo->restart_interval;
    E->next_restart = (E->next_restart + 1) & 7;
}

static uint32_t read_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Put reader R (DC predictors last_dc) at index entry (row, j), i.e. at MCU (row, j * step). */
static void seek(j_decompress_ptr cinfo, dm_entropy *E, long row, long j, bit_reader *R, int *last_dc) {
    const dm_index *I = E->index;
    const uint8_t *e = I->entries + ((size_t)row * I->per_row + j) * I->entry_bytes;
    uint32_t at = read_le32(e);
    size_t byte = at & ((1u << 29) - 1);
    int bit = (int)(at >> 29);
    const uint8_t *end = E->reader.end;
    if (byte >= (size_t)(end - E->scan)) WARNMS(cinfo, JWRN_JPEG_EOF); /* a corrupt index: longjmps */
    bit_reader B = {E->scan + byte, end, 0, 0, 0, 0};
    refill(&B);
    B.bits <<= bit;
    B.nbits -= bit;
    *R = B;
    for (int ci = 0; ci < I->ncomp; ci++) last_dc[ci] = (int16_t)(e[4 + 2 * ci] | e[5 + 2 * ci] << 8);
}

/* Put the first reader at the index entry at or before MCU (row, col), unless it already stands between the two
 * (the MCUs from where it stands to (row, col) are then decoded and dropped by the caller). */
static void approach(j_decompress_ptr cinfo, dm_entropy *E, long row, long col) {
    const long entry = row * E->index->mcus_x + col / E->index->step * E->index->step;
    if (E->position > row * E->index->mcus_x + col || E->position < entry) {
        seek(cinfo, E, row, col / E->index->step, &E->reader, E->last_dc);
        E->position = entry;
    }
}

/* Start a row pair at MCU (row, col), the first column libjpeg uses: the second reader at the entry at or
 * before (row + 1, col), the MCUs up to the column dropped, in lockstep with the first reader's. */
static boolean start_pair(j_decompress_ptr cinfo, dm_entropy *E, long row, long col) {
    const long target = row * E->index->mcus_x + col, j = col / E->index->step;
    approach(cinfo, E, row, col);
    seek(cinfo, E, row + 1, j, &E->second, E->second_dc);
    E->pair_row = row;
    long second = j * E->index->step; /* the column the second reader stands at */
    for (; E->position < target && second < col; E->position++, second++)
        if (!decode_blocks_pair(cinfo, E, NULL, NULL)) return FALSE;
    for (; E->position < target; E->position++)
        if (!decode_blocks(cinfo, E, &E->reader, E->last_dc, NULL)) return FALSE;
    for (; second < col; second++)
        if (!decode_blocks(cinfo, E, &E->second, E->second_dc, NULL)) return FALSE;
    return TRUE;
}

/* libjpeg's decode_mcu. MCU_data NULL: rows jpeg_skip_scanlines skips, whose coefficients are dropped.
 * With the index, the crop's rows are decoded in pairs: while libjpeg asks for the first row's MCUs, the
 * second row's are decoded alongside (decode_blocks_pair) into E->ahead, from where they are copied when
 * libjpeg asks for them. */
static boolean decode_mcu(j_decompress_ptr cinfo, JBLOCKROW *MCU_data) {
    dm_entropy *E = (dm_entropy *)cinfo->client_data;
    if (E->index) {
        const long row = E->row, col = E->col, mcus_x = E->index->mcus_x;
        if (++E->col == mcus_x) {
            E->col = 0;
            E->row++;
        }
        if (!MCU_data || col < E->col0 || col > E->col1) return TRUE; /* nobody uses it: not decoded */
        const size_t ahead = (size_t)(col - E->col0) * cinfo->blocks_in_MCU * DCTSIZE2; /* pairs only */
        if (E->pair_row >= 0 && row == E->pair_row + 1) { /* decoded with the row above */
            for (int b = 0; b < cinfo->blocks_in_MCU; b++)
                memcpy(MCU_data[b][0], E->ahead + ahead + (size_t)b * DCTSIZE2, sizeof(JBLOCK));
            return TRUE;
        }
        if (row != E->pair_row && row < E->last_row && !start_pair(cinfo, E, row, col)) return FALSE;
        if (row == E->pair_row) {
            E->position++;
            return decode_blocks_pair(cinfo, E, MCU_data, E->ahead + ahead);
        }
        /* A row on its own: the crop's last, when it has an odd number of rows. */
        approach(cinfo, E, row, col);
        for (const long target = row * mcus_x + col; E->position < target; E->position++)
            if (!decode_blocks(cinfo, E, &E->reader, E->last_dc, NULL)) return FALSE;
        E->position++;
        return decode_blocks(cinfo, E, &E->reader, E->last_dc, MCU_data);
    }
    if (cinfo->restart_interval) {
        if (E->restarts_to_go == 0) restart(cinfo, E);
        E->restarts_to_go--;
    }
    return decode_blocks(cinfo, E, &E->reader, E->last_dc, MCU_data);
}

/* A file we decode the same way libjpeg does: one interleaved (or single-component) baseline Huffman scan with
 * 8-bit samples. */
static int decodable(j_decompress_ptr cinfo) {
    return !(cinfo->progressive_mode || cinfo->arith_code || cinfo->data_precision != 8 ||
             cinfo->inputctl->has_multiple_scans || cinfo->comps_in_scan != cinfo->num_components ||
             cinfo->comps_in_scan > MAX_COMPS_IN_SCAN || cinfo->Ss != 0 || cinfo->Se != DCTSIZE2 - 1 ||
             cinfo->Ah != 0 || cinfo->Al != 0 || cinfo->blocks_in_MCU > D_MAX_BLOCKS_IN_MCU);
}

void dm_entropy_free(dm_entropy *entropy) {
    if (entropy) free(entropy->ahead);
    free(entropy);
}

int dm_entropy_install(dm_entropy **entropy, j_decompress_ptr cinfo, const dm_index *index, int xoffset,
                       int width, int rows_end) {
    if (!decodable(cinfo)) return 0;
    if (!*entropy && !(*entropy = (dm_entropy *)calloc(1, sizeof(dm_entropy)))) return 0;
    dm_entropy *E = *entropy;
    for (int ci = 0; ci < cinfo->comps_in_scan; ci++) {
        const jpeg_component_info *c = cinfo->cur_comp_info[ci];
        if (c->dc_tbl_no < 0 || c->dc_tbl_no >= NUM_HUFF_TBLS || c->ac_tbl_no < 0 || c->ac_tbl_no >= NUM_HUFF_TBLS)
            return 0;
        const JHUFF_TBL *dc = cinfo->dc_huff_tbl_ptrs[c->dc_tbl_no], *ac = cinfo->ac_huff_tbl_ptrs[c->ac_tbl_no];
        huff_table *tdc = &E->tables[c->dc_tbl_no], *tac = &E->tables[NUM_HUFF_TBLS + c->ac_tbl_no];
        if (!dc || !ac || !build_table(tdc, dc, 0) || !build_table(tac, ac, 1)) return 0;
        E->dc[ci] = tdc;
        E->ac[ci] = tac;
        E->last_dc[ci] = 0;
    }
    E->scan = cinfo->src->next_input_byte;
    E->reader = (bit_reader){E->scan, E->scan + cinfo->src->bytes_in_buffer, 0, 0, 0, 0};
    E->restarts_to_go = cinfo->restart_interval;
    E->next_restart = 0;
    E->index = NULL;
    if (index && !cinfo->restart_interval && index->mcus_x == (int)cinfo->MCUs_per_row &&
        index->mcus_y == (int)cinfo->total_iMCU_rows && index->ncomp == cinfo->comps_in_scan &&
        (cinfo->comps_in_scan > 1 || (cinfo->max_h_samp_factor == 1 && cinfo->max_v_samp_factor == 1))) {
        /* The MCU columns libjpeg runs the IDCT on after jpeg_crop_scanline (its first_iMCU_col and
         * last_iMCU_col); it ignores the coefficients of all others. */
        const int align = MIN_DCT_SIZE(cinfo) * (cinfo->comps_in_scan == 1 ? 1 : cinfo->max_h_samp_factor);
        E->index_copy = *index;
        E->index = &E->index_copy;
        E->position = E->row = E->col = 0;
        E->col0 = width > 0 ? xoffset / align : 0;
        E->col1 = width > 0 ? (xoffset + width - 1) / align : index->mcus_x - 1;
        /* Rows are decoded in pairs down to the MCU row of output row rows_end - 1, given room for one row's
         * coefficients. */
        const int mcu_rows = MIN_DCT_V_SIZE(cinfo) * (cinfo->comps_in_scan == 1 ? 1 : cinfo->max_v_samp_factor);
        E->last_row = rows_end > 0 ? (rows_end - 1) / mcu_rows : -1;
        if (E->last_row > index->mcus_y - 1) E->last_row = index->mcus_y - 1;
        E->pair_row = -1;
        size_t bytes = (size_t)(E->col1 - E->col0 + 1) * cinfo->blocks_in_MCU * sizeof(JBLOCK);
        if (E->ahead_bytes < bytes) {
            free(E->ahead);
            E->ahead = (JCOEF *)malloc(bytes);
            E->ahead_bytes = E->ahead ? bytes : 0;
        }
        if (!E->ahead) E->last_row = -1; /* out of memory: rows one at a time */
    }
    cinfo->client_data = E;
    cinfo->entropy->decode_mcu = decode_mcu;
    return E->index ? 2 : 1;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Finding an index                                                                                         */

static int read_be16(const uint8_t *p) { return (p[0] << 8) | p[1]; }
static int read_le16(const uint8_t *p) { return p[0] | (p[1] << 8); }

int dm_next_segment(const uint8_t *s, size_t n, size_t *pos, int *marker, size_t *payload, size_t *length) {
    size_t p = *pos;
    if (p >= n || s[p] != 0xFF) return 0;
    while (p < n && s[p] == 0xFF) p++;
    if (p + 3 > n) return 0;
    *marker = s[p++];
    if (*marker == 0x01 || (*marker >= 0xD0 && *marker <= 0xD9)) return 0;
    size_t len = (size_t)read_be16(s + p);
    if (len < 2 || p + len > n) return 0;
    *payload = p + 2;
    *length = len - 2;
    *pos = p + len;
    return 1;
}

/* Walk the marker segments from SOI to the first SOS. Returns the offset of the first byte of entropy-coded data
 * (0 if the header is malformed); *found receives the index segment's payload offset (0 if none). */
static size_t walk_header(const uint8_t *s, size_t n, size_t *found, size_t *found_len) {
    size_t pos = 2, payload, len;
    int marker;
    *found = *found_len = 0;
    if (n < 4 || s[0] != 0xFF || s[1] != 0xD8) return 0;
    while (dm_next_segment(s, n, &pos, &marker, &payload, &len)) {
        if (marker == INDEX_MARKER && len >= INDEX_HEADER && memcmp(s + payload, INDEX_MAGIC, 8) == 0) {
            *found = payload;
            *found_len = len;
        }
        if (marker == 0xDA) return pos;
    }
    return 0;
}

int dm_index_find(const uint8_t *data, size_t size, dm_index *I) {
    size_t at, len;
    size_t scan_start = walk_header(data, size, &at, &len);
    if (!scan_start || !at) return 0;
    const uint8_t *h = data + at + 8;
    I->step = read_le16(h);
    I->mcus_x = read_le16(h + 2);
    I->mcus_y = read_le16(h + 4);
    I->ncomp = h[6];
    I->entry_bytes = h[7];
    uint32_t scan_bytes = read_le32(h + 8);
    if (I->step < 1 || I->mcus_x < 1 || I->mcus_y < 1 || I->ncomp < 1 || I->ncomp > MAX_COMPS_IN_SCAN ||
        I->entry_bytes != 4 + 2 * I->ncomp || scan_bytes != size - scan_start)
        return 0;
    I->per_row = (I->mcus_x + I->step - 1) / I->step;
    if ((size_t)INDEX_HEADER + (size_t)I->mcus_y * I->per_row * I->entry_bytes != len) return 0;
    I->entries = h + 12;
    return 1;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Building an index                                                                                        */

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
} index_error_mgr;

static void index_error_exit(j_common_ptr cinfo) { longjmp(((index_error_mgr *)cinfo->err)->jump, 1); }

static void index_emit_message(j_common_ptr cinfo, int level) {
    if (level < 0 && cinfo->err->msg_code != JWRN_EXTRANEOUS_DATA && cinfo->err->msg_code != JWRN_JFIF_MAJOR)
        index_error_exit(cinfo); /* corrupt data: no index for it */
}

/* Where the reader's next unread bit is: offset of its byte in the scan, and the bit in it. */
static size_t bit_position(const dm_entropy *E, int *bit) {
    int unread = E->reader.nbits - E->reader.padding;
    const uint8_t *p = E->reader.p;
    for (int i = 0; i < (unread + 7) / 8; i++)
        p -= (p - E->scan >= 2 && p[-1] == 0x00 && p[-2] == 0xFF) ? 2 : 1; /* a stuffed 0xFF is two bytes */
    *bit = (8 - unread % 8) % 8;
    return (size_t)(p - E->scan);
}

/* Decode every MCU of the scan and record the entries. Returns the payload size, 0 if the file gets no index,
 * -1 on corrupt data (through longjmp). */
static long build_entries(j_decompress_ptr cinfo, dm_entropy **entropy, int spacing, uint8_t *payload,
                          size_t scan_bytes) {
    jpeg_start_decompress(cinfo);
    if (cinfo->restart_interval || !dm_entropy_install(entropy, cinfo, NULL, 0, 0, 0)) return 0;
    /* An MCU is 8 pixels wide per horizontal sampling unit (16 for 4:2:0), 8 in a single-component scan. */
    const int mcu_pixels = DCTSIZE * (cinfo->comps_in_scan == 1 ? 1 : cinfo->max_h_samp_factor);
    int step = spacing / mcu_pixels > 1 ? spacing / mcu_pixels : 1;
    dm_entropy *E = *entropy;
    const long mcus_x = (long)cinfo->MCUs_per_row, mcus_y = (long)cinfo->total_iMCU_rows;
    const int ncomp = cinfo->comps_in_scan, entry_bytes = 4 + 2 * ncomp;
    if (cinfo->comps_in_scan == 1 && (cinfo->max_h_samp_factor != 1 || cinfo->max_v_samp_factor != 1)) return 0;
    if (mcus_x > 65535 || mcus_y > 65535 || scan_bytes >= (1u << 29)) return 0;
    while ((size_t)INDEX_HEADER + (size_t)mcus_y * ((mcus_x + step - 1) / step) * entry_bytes > INDEX_MAX_PAYLOAD - 8) {
        if (step >= mcus_x) return 0; /* too many rows for one segment */
        step *= 2;
    }
    const long per_row = (mcus_x + step - 1) / step;
    uint8_t *e = payload + INDEX_HEADER;
    for (long r = 0; r < mcus_y; r++) {
        for (long c = 0; c < mcus_x; c++) {
            if (c % step == 0) {
                int bit;
                uint32_t at = (uint32_t)bit_position(E, &bit) | (uint32_t)bit << 29;
                for (int i = 0; i < 4; i++) *e++ = (uint8_t)(at >> (8 * i));
                for (int ci = 0; ci < ncomp; ci++) {
                    *e++ = (uint8_t)E->last_dc[ci];
                    *e++ = (uint8_t)((unsigned)E->last_dc[ci] >> 8);
                }
            }
            if (!decode_blocks(cinfo, E, &E->reader, E->last_dc, NULL)) return -1;
        }
    }
    memcpy(payload, INDEX_MAGIC, 8);
    const uint32_t fields[] = {(uint32_t)step, (uint32_t)mcus_x, (uint32_t)mcus_y};
    for (int i = 0; i < 3; i++) {
        payload[8 + 2 * i] = (uint8_t)fields[i];
        payload[9 + 2 * i] = (uint8_t)(fields[i] >> 8);
    }
    payload[14] = (uint8_t)ncomp;
    payload[15] = (uint8_t)entry_bytes;
    for (int i = 0; i < 4; i++) payload[16 + i] = (uint8_t)(scan_bytes >> (8 * i));
    return INDEX_HEADER + mcus_y * per_row * entry_bytes;
}

int64_t dm_index_add(const uint8_t *src, uint64_t size, int32_t spacing, uint8_t *dst, uint64_t cap, char *message,
                     int32_t message_len) {
    size_t found, found_len;
    size_t scan_start = walk_header(src, size, &found, &found_len);
    if (message_len > 0) message[0] = 0;
    if (scan_start && found) return 0; /* already indexed */
    if (cap < size + 65540) {
        snprintf(message, (size_t)message_len, "output buffer too small");
        return -1;
    }
    /* The payload goes to its final place: after SOI and a JFIF APP0 segment, if there is one (JFIF wants it
     * first), ahead of the rest of the header. */
    size_t insert = 2;
    if (scan_start && src[2] == 0xFF && src[3] == JPEG_APP0) insert = 4 + (size_t)read_be16(src + 4);
    uint8_t *payload = dst + insert + 4;

    struct jpeg_decompress_struct cinfo;
    index_error_mgr err;
    dm_entropy *entropy = NULL;
    volatile int64_t result = -1;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = index_error_exit;
    err.pub.emit_message = index_emit_message;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        if (message_len > 0) (*cinfo.err->format_message)((j_common_ptr)&cinfo, message);
        result = -1;
    } else {
        jpeg_mem_src(&cinfo, src, (unsigned long)size);
        jpeg_read_header(&cinfo, TRUE);
        long len = scan_start ? build_entries(&cinfo, &entropy, spacing, payload, size - scan_start) : 0;
        if (len > 0) {
            memcpy(dst, src, insert);
            dst[insert] = 0xFF;
            dst[insert + 1] = INDEX_MARKER;
            dst[insert + 2] = (uint8_t)((len + 2) >> 8);
            dst[insert + 3] = (uint8_t)(len + 2);
            memcpy(dst + insert + 4 + len, src + insert, size - insert);
            result = (int64_t)(size + 4 + (size_t)len);
        } else {
            result = 0;
        }
    }
    jpeg_destroy_decompress(&cinfo);
    dm_entropy_free(entropy);
    return result;
}
