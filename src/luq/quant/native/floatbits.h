/* Float bit conversions shared by the compiled helpers (included, not built on its own). */
#ifndef LUQ_FLOATBITS_H
#define LUQ_FLOATBITS_H
#include <stdint.h>
#include <string.h>

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even (values here are finite) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
#endif
