/*
 * A pull-the-token switch in front of the real SoftHSM2, for the HSM fault
 * tests (tests/hsm_faults.rs). Every PKCS#11 call goes to SoftHSM2
 * unchanged; while the file named by $TVW_UNPLUG_FLAG exists the module
 * behaves like a token that was pulled out: every session is closed and
 * SoftHSM2 is finalized (the login state and its in-memory view of the
 * token are gone, as on a real removal), the token is absent from
 * C_GetSlotList, C_OpenSession answers CKR_TOKEN_NOT_PRESENT and the calls
 * that start an operation answer CKR_DEVICE_REMOVED. When the file is gone
 * the token is "reinserted": SoftHSM2 is initialized again and reads the
 * token from disk (a PIN changed meanwhile is the one it checks), and a new
 * session must log in again.
 *
 * The switch is flipped between requests (the fault tests are sequential):
 * finalizing SoftHSM2 under a call in flight on another thread is not safe.
 *
 * Build: cc -shared -fPIC -o pkcs11-unplug.so pkcs11-unplug.c -ldl -lpthread
 * The real module: $TVW_UNPLUG_MODULE (default /usr/lib/softhsm/libsofthsm2.so).
 * Only the PKCS#11 v2.40 function list layout is needed: no headers.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef unsigned char CK_BBOOL;

#define CKR_OK 0x00UL
#define CKR_GENERAL_ERROR 0x05UL
#define CKR_DEVICE_REMOVED 0x32UL
#define CKR_TOKEN_NOT_PRESENT 0xE0UL

/* CK_FUNCTION_LIST: a CK_VERSION, then 68 function pointers. */
#define N_FUNCTIONS 68
struct function_list {
    unsigned char version[2];
    void *f[N_FUNCTIONS];
};

enum {
    I_INITIALIZE = 0,
    I_FINALIZE = 1,
    I_GET_FUNCTION_LIST = 3,
    I_GET_SLOT_LIST = 4,
    I_OPEN_SESSION = 12,
    I_CLOSE_ALL_SESSIONS = 14,
    I_LOGIN = 18,
    I_CREATE_OBJECT = 20,
    I_GET_ATTRIBUTE_VALUE = 24,
    I_FIND_OBJECTS_INIT = 26,
    I_ENCRYPT_INIT = 29,
    I_DECRYPT_INIT = 33,
    I_SIGN_INIT = 42,
    I_GENERATE_KEY = 58,
    I_GENERATE_KEY_PAIR = 59,
    I_GENERATE_RANDOM = 64,
};

static struct function_list *real;
static struct function_list mine;
static pthread_mutex_t transition = PTHREAD_MUTEX_INITIALIZER;
static int out; /* 1 while SoftHSM2 is finalized ("pulled out") */

typedef CK_RV (*get_slot_list_fn)(CK_BBOOL, CK_ULONG *, CK_ULONG *);
typedef CK_RV (*close_all_fn)(CK_ULONG);
typedef CK_RV (*init_fn)(void *);

/* CK_C_INITIALIZE_ARGS: four mutex callbacks, flags, reserved. */
struct init_args {
    void *create, *destroy, *lock, *unlock;
    CK_ULONG flags;
    void *reserved;
};
#define CKF_OS_LOCKING_OK 0x2UL

static int unplugged(void) {
    const char *flag = getenv("TVW_UNPLUG_FLAG");
    int want = flag != NULL && access(flag, F_OK) == 0;
    if (want == __atomic_load_n(&out, __ATOMIC_SEQ_CST))
        return want;
    pthread_mutex_lock(&transition);
    if (want && !out) {
        CK_ULONG slots[64];
        CK_ULONG n = 64;
        if (((get_slot_list_fn)real->f[I_GET_SLOT_LIST])(1, slots, &n) == CKR_OK) {
            for (CK_ULONG i = 0; i < n && i < 64; i++)
                ((close_all_fn)real->f[I_CLOSE_ALL_SESSIONS])(slots[i]);
        }
        ((init_fn)real->f[I_FINALIZE])(NULL);
        __atomic_store_n(&out, 1, __ATOMIC_SEQ_CST);
    } else if (!want && out) {
        struct init_args args = {NULL, NULL, NULL, NULL, CKF_OS_LOCKING_OK, NULL};
        if (((init_fn)real->f[I_INITIALIZE])(&args) == CKR_OK)
            __atomic_store_n(&out, 0, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&transition);
    return want;
}

static CK_RV get_slot_list(CK_BBOOL present, CK_ULONG *list, CK_ULONG *count) {
    if (present && unplugged()) {
        *count = 0;
        return CKR_OK;
    }
    return ((get_slot_list_fn)real->f[I_GET_SLOT_LIST])(present, list, count);
}

static CK_RV open_session(CK_ULONG slot, CK_ULONG flags, void *app, void *notify, CK_ULONG *out) {
    if (unplugged())
        return CKR_TOKEN_NOT_PRESENT;
    return ((CK_RV(*)(CK_ULONG, CK_ULONG, void *, void *, CK_ULONG *))real->f[I_OPEN_SESSION])(
        slot, flags, app, notify, out);
}

/* The operation starters, by arity (every argument is an integer or a
 * pointer, so one forwarder per argument count suffices on this ABI). */
#define FORWARD3(name, idx)                                                        \
    static CK_RV name(CK_ULONG a, void *b, CK_ULONG c) {                           \
        if (unplugged())                                                           \
            return CKR_DEVICE_REMOVED;                                             \
        return ((CK_RV(*)(CK_ULONG, void *, CK_ULONG))real->f[idx])(a, b, c);      \
    }
#define FORWARD4(name, idx)                                                        \
    static CK_RV name(CK_ULONG a, void *b, CK_ULONG c, void *d) {                  \
        if (unplugged())                                                           \
            return CKR_DEVICE_REMOVED;                                             \
        return ((CK_RV(*)(CK_ULONG, void *, CK_ULONG, void *))real->f[idx])(a, b, c, d); \
    }

/* C_Login(session, user_type, pin, pin_len) */
static CK_RV login(CK_ULONG s, CK_ULONG user, void *pin, CK_ULONG len) {
    if (unplugged())
        return CKR_DEVICE_REMOVED;
    return ((CK_RV(*)(CK_ULONG, CK_ULONG, void *, CK_ULONG))real->f[I_LOGIN])(s, user, pin, len);
}
/* C_CreateObject(session, template, count, handle_out) */
FORWARD4(create_object, I_CREATE_OBJECT)
/* C_GetAttributeValue(session, object, template, count) */
static CK_RV get_attribute_value(CK_ULONG s, CK_ULONG o, void *t, CK_ULONG n) {
    if (unplugged())
        return CKR_DEVICE_REMOVED;
    return ((CK_RV(*)(CK_ULONG, CK_ULONG, void *, CK_ULONG))real->f[I_GET_ATTRIBUTE_VALUE])(s, o, t, n);
}
/* C_FindObjectsInit(session, template, count) */
FORWARD3(find_objects_init, I_FIND_OBJECTS_INIT)
/* C_EncryptInit / C_DecryptInit / C_SignInit(session, mechanism, key) */
FORWARD3(encrypt_init, I_ENCRYPT_INIT)
FORWARD3(decrypt_init, I_DECRYPT_INIT)
FORWARD3(sign_init, I_SIGN_INIT)
/* C_GenerateKey(session, mechanism, template, count, key_out) */
static CK_RV generate_key(CK_ULONG s, void *m, void *t, CK_ULONG n, void *out) {
    if (unplugged())
        return CKR_DEVICE_REMOVED;
    return ((CK_RV(*)(CK_ULONG, void *, void *, CK_ULONG, void *))real->f[I_GENERATE_KEY])(s, m, t, n, out);
}
/* C_GenerateKeyPair(session, mechanism, pub, npub, priv, npriv, pub_out, priv_out) */
static CK_RV generate_key_pair(CK_ULONG s, void *m, void *pt, CK_ULONG pn, void *kt, CK_ULONG kn,
                               void *po, void *ko) {
    if (unplugged())
        return CKR_DEVICE_REMOVED;
    return ((CK_RV(*)(CK_ULONG, void *, void *, CK_ULONG, void *, CK_ULONG, void *, void *))
                real->f[I_GENERATE_KEY_PAIR])(s, m, pt, pn, kt, kn, po, ko);
}
/* C_GenerateRandom(session, out, len) */
FORWARD3(generate_random, I_GENERATE_RANDOM)

CK_RV C_GetFunctionList(struct function_list **out) {
    if (out == NULL)
        return CKR_GENERAL_ERROR;
    if (real == NULL) {
        const char *path = getenv("TVW_UNPLUG_MODULE");
        void *lib = dlopen(path ? path : "/usr/lib/softhsm/libsofthsm2.so", RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL)
            return CKR_GENERAL_ERROR;
        CK_RV (*get)(struct function_list **) =
            (CK_RV(*)(struct function_list **))dlsym(lib, "C_GetFunctionList");
        if (get == NULL || get(&real) != CKR_OK || real == NULL)
            return CKR_GENERAL_ERROR;
        memcpy(&mine, real, sizeof mine);
        mine.f[I_GET_FUNCTION_LIST] = (void *)C_GetFunctionList;
        mine.f[I_GET_SLOT_LIST] = (void *)get_slot_list;
        mine.f[I_OPEN_SESSION] = (void *)open_session;
        mine.f[I_LOGIN] = (void *)login;
        mine.f[I_CREATE_OBJECT] = (void *)create_object;
        mine.f[I_GET_ATTRIBUTE_VALUE] = (void *)get_attribute_value;
        mine.f[I_FIND_OBJECTS_INIT] = (void *)find_objects_init;
        mine.f[I_ENCRYPT_INIT] = (void *)encrypt_init;
        mine.f[I_DECRYPT_INIT] = (void *)decrypt_init;
        mine.f[I_SIGN_INIT] = (void *)sign_init;
        mine.f[I_GENERATE_KEY] = (void *)generate_key;
        mine.f[I_GENERATE_KEY_PAIR] = (void *)generate_key_pair;
        mine.f[I_GENERATE_RANDOM] = (void *)generate_random;
    }
    *out = &mine;
    return CKR_OK;
}
