#include "CQRCode.h"

#include <dlfcn.h>
#include <qrencode.h>
#include <stdlib.h>

typedef QRcode *(*encode_string_fn)(const char *string, int version, QRecLevel level, QRencodeMode hint,
                                    int casesensitive);
typedef void (*free_fn)(QRcode *code);

int cqr_encode(const char *text, unsigned char **modules, const char **error) {
    void *library = dlopen("libqrencode.so.4", RTLD_NOW | RTLD_LOCAL);
    if (library == NULL) library = dlopen("libqrencode.so", RTLD_NOW | RTLD_LOCAL);
    if (library == NULL) {
        *error = "libqrencode is not installed (apt-get install libqrencode4)";
        return 0;
    }
    encode_string_fn encode = (encode_string_fn)dlsym(library, "QRcode_encodeString");
    free_fn release = (free_fn)dlsym(library, "QRcode_free");
    if (encode == NULL || release == NULL) {
        *error = "the libqrencode found lacks QRcode_encodeString";
        dlclose(library);
        return 0;
    }
    // Version 0: the smallest that fits; level M survives a slightly damaged or dim screen.
    QRcode *code = encode(text, 0, QR_ECLEVEL_M, QR_MODE_8, 1);
    if (code == NULL) {
        *error = "libqrencode could not encode the link";
        dlclose(library);
        return 0;
    }
    int width = code->width;
    unsigned char *out = malloc((size_t)width * (size_t)width);
    if (out != NULL) {
        for (int i = 0; i < width * width; i++) out[i] = code->data[i] & 1;
    }
    release(code);
    dlclose(library);
    if (out == NULL) {
        *error = "out of memory";
        return 0;
    }
    *modules = out;
    return width;
}

void cqr_free(unsigned char *modules) { free(modules); }
