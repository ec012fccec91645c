#ifndef CQRCODE_H
#define CQRCODE_H

/// Encodes `text` as a QR code with libqrencode (Debian: libqrencode4), loaded at run time so that the
/// programs do not depend on it unless `invite` is asked for a code. On success returns the number of modules
/// per side and sets `*modules` to width*width bytes (row by row, 1 = dark), to be freed with `cqr_free`; on
/// failure returns 0 and sets `*error` to a static message.
int cqr_encode(const char *text, unsigned char **modules, const char **error);

void cqr_free(unsigned char *modules);

#endif
