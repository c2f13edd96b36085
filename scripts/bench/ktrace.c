// ktrace: a CUPTI activity tracer loaded into every CUDA process of a run through
// CUDA_INJECTION64_PATH, so one timeline holds the gate's and the expert workers' kernels
// (the device machines have no Nsight Systems). Each process writes one TSV file:
//
//   kind  start_ns  end_ns  stream  correlation  graph  graph_node  grid  block  name
//
// kind is K (kernel), M (memcpy), S (memset) or D (driver API call; name = the call).
// Start and end come from CUPTI's one clock, so the files of several processes on a host
// line up. scripts/bench/ktrace.py reads them.
//
// Environment:
//   KTRACE_DIR     where the files go (required; the tracer does nothing without it)
//   KTRACE_ONLY    trace only processes whose /proc/self/exe contains this text
//                  (e.g. "moemesh": the MPS daemon that `up` starts inherits the environment)
//   KTRACE_DRIVER  0 leaves out the driver API calls (default 1)
//   KTRACE_MAX     at most this many records a process (default 4,000,000)
//
// Build (here, with CUPTI's headers from the nvidia-cuda-cupti wheel; the GPU machine's
// torch environment has libcupti.so.13):
//   gcc -O2 -shared -fPIC -I CUPTI/include -o ktrace.so scripts/bench/ktrace.c
//     -L CUPTI/lib -l:libcupti.so.13 -lpthread
#include <cupti.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BUF_SIZE (8u << 20)
#define ALIGN 8

// CUPTI hands buffers over on its own thread, and at exit on the main one: the file and the
// count are written under this lock.
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *out;
static unsigned long long records, max_records = 4000000ull;

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_num_records) {
    void *p = NULL;
    if (posix_memalign(&p, ALIGN, BUF_SIZE) != 0) p = NULL;
    *buffer = (uint8_t *)p;
    *size = p ? BUF_SIZE : 0;
    *max_num_records = 0;
}

static void write_record(const CUpti_Activity *record) {
    if (!out || records >= max_records) return;
    switch (record->kind) {
    case CUPTI_ACTIVITY_KIND_KERNEL:
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)record;
        fprintf(out, "K\t%llu\t%llu\t%u\t%u\t%u\t%llu\t%d,%d,%d\t%d,%d,%d\t%s\n",
                (unsigned long long)k->start, (unsigned long long)k->end, k->streamId,
                k->correlationId, k->graphId, (unsigned long long)k->graphNodeId, k->gridX,
                k->gridY, k->gridZ, k->blockX, k->blockY, k->blockZ, k->name ? k->name : "?");
        break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)record;
        fprintf(out, "M\t%llu\t%llu\t%u\t%u\t%u\t%llu\t-\t-\tmemcpy kind %u bytes %llu\n",
                (unsigned long long)m->start, (unsigned long long)m->end, m->streamId,
                m->correlationId, m->graphId, (unsigned long long)m->graphNodeId,
                (unsigned)m->copyKind, (unsigned long long)m->bytes);
        break;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
        const CUpti_ActivityMemset4 *m = (const CUpti_ActivityMemset4 *)record;
        fprintf(out, "S\t%llu\t%llu\t%u\t%u\t%u\t%llu\t-\t-\tmemset bytes %llu\n",
                (unsigned long long)m->start, (unsigned long long)m->end, m->streamId,
                m->correlationId, m->graphId, (unsigned long long)m->graphNodeId,
                (unsigned long long)m->bytes);
        break;
    }
    case CUPTI_ACTIVITY_KIND_DRIVER: {
        const CUpti_ActivityAPI *a = (const CUpti_ActivityAPI *)record;
        const char *name = NULL;
        if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name) != CUPTI_SUCCESS)
            name = NULL;
        fprintf(out, "D\t%llu\t%llu\t%u\t%u\t0\t0\t-\t-\t%s\n", (unsigned long long)a->start,
                (unsigned long long)a->end, a->threadId, a->correlationId, name ? name : "?");
        break;
    }
    default:
        return;
    }
    records++;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer,
                                      size_t size, size_t valid) {
    (void)ctx;
    (void)stream;
    (void)size;
    CUpti_Activity *record = NULL;
    pthread_mutex_lock(&lock);
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) write_record(record);
    if (out) fflush(out);
    pthread_mutex_unlock(&lock);
    free(buffer);
}

static void at_exit(void) {
    cuptiActivityFlushAll(1);
    pthread_mutex_lock(&lock);
    if (out) fclose(out);
    out = NULL;
    pthread_mutex_unlock(&lock);
}

static int enable(CUpti_ActivityKind kind) {
    CUptiResult r = cuptiActivityEnable(kind);
    if (r != CUPTI_SUCCESS) {
        const char *msg = NULL;
        cuptiGetResultString(r, &msg);
        fprintf(stderr, "ktrace: cuptiActivityEnable(%d): %s\n", (int)kind, msg ? msg : "?");
        return 1;
    }
    return 0;
}

int InitializeInjection(void) {
    const char *dir = getenv("KTRACE_DIR");
    if (!dir || !*dir) return 1;
    char exe[4096] = {0};
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n < 0) n = 0;
    exe[n] = 0;
    const char *only = getenv("KTRACE_ONLY");
    if (only && *only && !strstr(exe, only)) return 1;
    const char *max = getenv("KTRACE_MAX");
    if (max && *max) max_records = strtoull(max, NULL, 10);

    char path[4352];
    snprintf(path, sizeof path, "%s/ktrace.%d.tsv", dir, (int)getpid());
    out = fopen(path, "w");
    if (!out) {
        fprintf(stderr, "ktrace: cannot write %s\n", path);
        return 1;
    }
    fprintf(out, "# exe %s\n", exe);

    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
        fprintf(stderr, "ktrace: cuptiActivityRegisterCallbacks failed\n");
        return 1;
    }
    int bad = enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    bad |= enable(CUPTI_ACTIVITY_KIND_MEMCPY);
    bad |= enable(CUPTI_ACTIVITY_KIND_MEMSET);
    const char *drv = getenv("KTRACE_DRIVER");
    if (!drv || strcmp(drv, "0") != 0) bad |= enable(CUPTI_ACTIVITY_KIND_DRIVER);
    // Records reach the file within half a second, so a process stopped by a signal
    // (a worker that `up` stops) leaves all but its last moments behind.
    cuptiActivityFlushPeriod(500);
    atexit(at_exit);
    fprintf(stderr, "ktrace: tracing %s into %s%s\n", exe, path, bad ? " (some kinds refused)" : "");
    return 1;
}
