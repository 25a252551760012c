/* af_indep: the benchmarks' independent baseline. libfabric only.
 *
 * A stand-alone program that moves the same bytes the `write` and `pingpong`
 * suites move, with nothing of asyncfabric in it: no header of ours, no code
 * of ours, only libfabric's public API as its man pages describe it. It plays
 * the part of `fi_rma_bw -e rdm -o writedata` (mode bw) and of a pingpong of
 * writedata (mode pingpong), so that asyncfabric and its raw loop can be
 * compared with what libfabric alone gets on this machine.
 *
 *   af_indep --role send|recv --provider shm|tcp [--node 127.0.0.1]
 *            --mode bw|pingpong --size BYTES --iters N [--window W]
 *            [--repeats R] [--warmup K] [--cpu C] [--timeout S] [--yield-every N]
 *
 * Both roles open one FI_EP_RDM endpoint (caps FI_RMA | FI_MSG), a CQ of
 * FI_CQ_FORMAT_DATA, an AV, and register one buffer of --size bytes,
 * honouring the mr_mode bits the provider returns (FI_MR_LOCAL: descriptors
 * on every transfer; FI_MR_VIRT_ADDR: remote addresses are virtual addresses,
 * else offsets from 0; FI_MR_PROV_KEY: the provider's key, else ours;
 * FI_MR_ALLOCATED: the buffer is allocated memory; FI_MR_ENDPOINT: the region
 * is bound to the endpoint and enabled). On providers that report the
 * FI_RX_CQ_DATA mode, every write carrying remote CQ data consumes a posted
 * receive: receives are kept posted (0 bytes each) and reposted as they go.
 *
 * Addresses are exchanged over stdin/stdout: each side prints
 *     INFO <provider> <mr_mode hex> <rx_cq_data 0|1> <window>
 *     ADDR <endpoint name, hex>
 *     MR <key hex> <base hex>
 * and then reads the peer's ADDR and MR lines from stdin (whoever starts the
 * pair relays them).
 *
 * bw: the sender keeps --window writedata of --size bytes in flight (the
 * immediate DATA_IMM), --iters of them a repeat; the receiver counts the
 * FI_REMOTE_CQ_DATA completions and, once it has a repeat's worth, answers
 * with a 0-byte writedata (ACK_IMM). The sender's clock runs from its first
 * post to that acknowledgement; it prints `REP <seconds>` per timed repeat.
 * pingpong: the sender writes --size bytes (DATA_IMM) and waits for the
 * receiver's --size bytes back (ACK_IMM), --iters round trips a repeat; it
 * prints `RTT <p50 us> <p99 us>`, `RTTSUM <seconds> <count>` and `RTTS <ns>...`
 * (every timed round trip) over the timed ones. In both modes the sender's buffer holds a position-dependent
 * pattern and the receiver checks its buffer against it at the end: a
 * mismatch is reported on stderr and the exit status is 3 (`VERIFY ok` on
 * stdout otherwise). A libfabric failure names the call and fi_strerror on
 * stderr, exit status 2. --corrupt (for the tests) spoils one byte of the
 * sender's pattern, so that the receiver's check must fail.
 *
 * Build: cc -O2 -Wall -Wextra -o af_indep af_indep.c -lfabric
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#define DATA_IMM 0x1D0EDA7Au /* the data writes (and pings) */
#define ACK_IMM 0x1D0EACC0u  /* the receiver's acknowledgements (and pongs) */
#define MAX_ADDR 1024
#define CQ_BATCH 32

/* ------------------------------------------------------------------ options */

static struct {
    int send; /* role: 1 send, 0 recv */
    const char *provider;
    const char *node;
    int pingpong; /* mode: 1 pingpong, 0 bw */
    size_t size;
    long iters, window, repeats, warmup;
    int cpu;
    double timeout_s;
    long yield_every;
    int corrupt;
} opt = {
    .send = -1,
    .provider = "shm",
    .size = 65536,
    .iters = 1000,
    .window = 64,
    .repeats = 1,
    .warmup = 1,
    .cpu = -1,
    .timeout_s = 60.0,
    .yield_every = 64,
};

static void usage(FILE *f) {
    fprintf(f,
            "usage: af_indep --role send|recv [--provider shm|tcp] [--node ADDR] [--mode bw|pingpong]\n"
            "                [--size BYTES] [--iters N] [--window W] [--repeats R] [--warmup K]\n"
            "                [--cpu C] [--timeout S] [--yield-every N]\n"
            "  --window W       writes in flight (bw; default 64, at most the provider's tx size)\n"
            "  --warmup K       untimed repeats first (default 1)\n"
            "  --cpu C          pin to CPU C (default -1: no pinning)\n"
            "  --timeout S      give up after S seconds without a completion (default 60)\n"
            "  --yield-every N  sched_yield() every N empty CQ polls (default 64; 0: pure spin)\n");
}

static void die_usage(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("af_indep: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    usage(stderr);
    exit(2);
}

static long parse_long(const char *name, const char *v, long min) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 0);
    if (errno || end == v || *end || x < min) die_usage("bad %s %s (an integer >= %ld)", name, v, min);
    return x;
}

static size_t parse_size(const char *v) {
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 0);
    if (errno || end == v || *v == '-') die_usage("bad --size %s", v);
    switch (*end) {
    case 'k': case 'K': x <<= 10; end++; break;
    case 'm': case 'M': x <<= 20; end++; break;
    case 'g': case 'G': x <<= 30; end++; break;
    default: break;
    }
    if (*end) die_usage("bad --size %s", v);
    return (size_t)x;
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        }
        if (!strcmp(a, "--corrupt")) {
            opt.corrupt = 1;
            continue;
        }
        if (i + 1 >= argc) die_usage("%s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--role")) {
            if (!strcmp(v, "send")) opt.send = 1;
            else if (!strcmp(v, "recv")) opt.send = 0;
            else die_usage("--role is send or recv, not %s", v);
        } else if (!strcmp(a, "--provider")) {
            opt.provider = v;
        } else if (!strcmp(a, "--node")) {
            opt.node = v;
        } else if (!strcmp(a, "--mode")) {
            if (!strcmp(v, "bw")) opt.pingpong = 0;
            else if (!strcmp(v, "pingpong")) opt.pingpong = 1;
            else die_usage("--mode is bw or pingpong, not %s", v);
        } else if (!strcmp(a, "--size")) {
            opt.size = parse_size(v);
        } else if (!strcmp(a, "--iters")) {
            opt.iters = parse_long(a, v, 1);
        } else if (!strcmp(a, "--window")) {
            opt.window = parse_long(a, v, 1);
        } else if (!strcmp(a, "--repeats")) {
            opt.repeats = parse_long(a, v, 1);
        } else if (!strcmp(a, "--warmup")) {
            opt.warmup = parse_long(a, v, 0);
        } else if (!strcmp(a, "--cpu")) {
            opt.cpu = (int)parse_long(a, v, -1);
        } else if (!strcmp(a, "--timeout")) {
            opt.timeout_s = (double)parse_long(a, v, 1);
        } else if (!strcmp(a, "--yield-every")) {
            opt.yield_every = parse_long(a, v, 0);
        } else {
            die_usage("unknown option %s", a);
        }
    }
    if (opt.send < 0) die_usage("--role send|recv is required");
}

/* ------------------------------------------------------------------ errors */

static void die_fi(const char *call, long rc) {
    int e = (int)(rc < 0 ? -rc : rc);
    fprintf(stderr, "af_indep (%s): %s failed: %s (%ld)\n", opt.send ? "send" : "recv", call,
            fi_strerror(e), rc);
    exit(2);
}

static void die_msg(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "af_indep (%s): ", opt.send ? "send" : "recv");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* ------------------------------------------------------------------ libfabric state */

enum { OP_WRITE = 1, OP_RECV = 2 };

/* A transfer's context: the provider may use the fi_context2 (FI_CONTEXT /
 * FI_CONTEXT2 modes), and hands it back in the completion. First member, so
 * the completion's op_context is the op itself. */
struct op {
    struct fi_context2 ctx;
    int kind;
    struct op *next;
};

static struct {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_ep *ep;
    struct fid_cq *cq;
    struct fid_av *av;
    struct fid_mr *mr;
    uint64_t mr_mode;
    int rx_cq_data;
    uint8_t *buf;
    size_t buflen;
    void *desc; /* the buffer's descriptor where FI_MR_LOCAL wants one, else NULL */
    uint64_t key, base;
    fi_addr_t peer;
    uint64_t peer_key, peer_base;

    struct op *writes, *free_writes; /* a pool of opt.window + 1 */
    struct op *recvs;                /* FI_RX_CQ_DATA: nrecv, kept posted */
    struct op *pending_recvs;        /* ... but for these, waiting for room */
    long nrecv;

    long inflight;                /* our writes not completed yet */
    uint64_t got_data, got_ack;   /* remote CQ data completions by immediate */
    double last_progress;
    unsigned long idle_polls;
} g;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint8_t pattern(size_t i) { return (uint8_t)(i ^ (i >> 8) ^ (i >> 16) ^ 0xA5u); }

/* Post one 0-byte receive (FI_RX_CQ_DATA); -FI_EAGAIN is left to the caller. */
static ssize_t post_recv(struct op *op) {
    ssize_t rc = fi_recv(g.ep, g.buf, 0, g.desc, FI_ADDR_UNSPEC, &op->ctx);
    if (rc && rc != -FI_EAGAIN) die_fi("fi_recv", (long)rc);
    return rc;
}

/* Receives to post again, that the provider had no room for yet. */
static void repost_pending(void) {
    while (g.pending_recvs) {
        struct op *op = g.pending_recvs;
        if (post_recv(op)) return;
        g.pending_recvs = op->next;
    }
}

static void cq_error(void) {
    struct fi_cq_err_entry err;
    memset(&err, 0, sizeof err);
    ssize_t rc = fi_cq_readerr(g.cq, &err, 0);
    if (rc < 0) die_fi("fi_cq_readerr", (long)rc);
    char pbuf[256];
    const char *prov = fi_cq_strerror(g.cq, err.prov_errno, err.err_data, pbuf, sizeof pbuf);
    fprintf(stderr, "af_indep (%s): completion error: %s (%d); provider: %s (%d)\n",
            opt.send ? "send" : "recv", fi_strerror(err.err), err.err, prov ? prov : "?",
            err.prov_errno);
    exit(2);
}

/* Reap what the CQ holds; returns how many completions it saw. */
static long poll_cq(void) {
    struct fi_cq_data_entry ent[CQ_BATCH];
    if (g.pending_recvs) repost_pending();
    ssize_t n = fi_cq_read(g.cq, ent, CQ_BATCH);
    if (n == -FI_EAGAIN) return 0;
    if (n == -FI_EAVAIL) cq_error();
    if (n < 0) die_fi("fi_cq_read", (long)n);
    for (ssize_t i = 0; i < n; i++) {
        struct fi_cq_data_entry *e = &ent[i];
        struct op *op = e->op_context;
        if (e->flags & FI_REMOTE_CQ_DATA) {
            uint32_t imm = (uint32_t)e->data;
            if (imm == DATA_IMM)
                g.got_data++;
            else if (imm == ACK_IMM)
                g.got_ack++;
            else
                die_msg("unexpected immediate 0x%08x in a completion", imm);
            if (g.rx_cq_data) {
                /* the write consumed one of our receives: put it back */
                if (!op || op->kind != OP_RECV)
                    die_msg("remote CQ data consumed a receive but the completion does not name it");
                op->next = g.pending_recvs;
                g.pending_recvs = op;
            }
            continue;
        }
        if (!op) die_msg("a completion without context (flags 0x%" PRIx64 ")", e->flags);
        if (op->kind == OP_WRITE) {
            op->next = g.free_writes;
            g.free_writes = op;
            g.inflight--;
        } else {
            die_msg("a receive completed without remote CQ data (flags 0x%" PRIx64 ")", e->flags);
        }
    }
    if (g.pending_recvs) repost_pending();
    if (n > 0) {
        g.last_progress = 0;
        g.idle_polls = 0;
    }
    return (long)n;
}

/* Called after an empty poll: yields now and then, gives up after opt.timeout_s. */
static void idle(const char *what) {
    g.idle_polls++;
    if (opt.yield_every && g.idle_polls % (unsigned long)opt.yield_every == 0) sched_yield();
    if (g.idle_polls % 4096) return;
    double t = now();
    if (g.last_progress == 0) {
        g.last_progress = t;
    } else if (t - g.last_progress > opt.timeout_s) {
        die_msg("timed out: nothing completed for %.0f s while waiting for %s", opt.timeout_s, what);
    }
}

static void post_write(size_t len, uint32_t imm) {
    while (!g.free_writes) {
        if (!poll_cq()) idle("a write to complete");
    }
    struct op *op = g.free_writes;
    g.free_writes = op->next;
    for (;;) {
        ssize_t rc = fi_writedata(g.ep, g.buf, len, g.desc, imm, g.peer, g.peer_base, g.peer_key,
                                  &op->ctx);
        if (rc == 0) break;
        if (rc != -FI_EAGAIN) die_fi("fi_writedata", (long)rc);
        if (!poll_cq()) idle("room to post a write");
    }
    g.inflight++;
}

static void drain_writes(void) {
    while (g.inflight > 0)
        if (!poll_cq()) idle("the last writes to complete");
}

static void hex_out(const char *tag, const uint8_t *p, size_t n) {
    printf("%s ", tag);
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
    putchar('\n');
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static void setup(void) {
    struct fi_info *hints = fi_allocinfo();
    if (!hints) die_msg("fi_allocinfo: out of memory");
    hints->ep_attr->type = FI_EP_RDM;
    hints->caps = FI_RMA | FI_MSG;
    /* what this program can live with: contexts it owns, receives posted for remote CQ data */
    hints->mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA;
    hints->domain_attr->mr_mode =
        FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_PROV_KEY | FI_MR_ALLOCATED | FI_MR_ENDPOINT;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    hints->fabric_attr->prov_name = strdup(opt.provider);
    int rc = fi_getinfo(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), opt.node, NULL,
                        opt.node ? FI_SOURCE : 0, hints, &g.info);
    fi_freeinfo(hints);
    if (rc) {
        fprintf(stderr,
                "af_indep (%s): fi_getinfo failed: %s (%d): no '%s' provider with FI_EP_RDM, "
                "FI_RMA and FI_MSG here\n",
                opt.send ? "send" : "recv", fi_strerror(-rc), rc, opt.provider);
        exit(2);
    }
    struct fi_info *fi = g.info; /* the first match: the provider's preferred one */
    g.mr_mode = fi->domain_attr->mr_mode;
    g.rx_cq_data = ((fi->mode | fi->rx_attr->mode) & FI_RX_CQ_DATA) != 0;
    if (fi->domain_attr->cq_data_size < 4)
        die_msg("provider %s carries %zu bytes of remote CQ data; 4 are needed",
                fi->fabric_attr->prov_name, fi->domain_attr->cq_data_size);
    if (fi->domain_attr->mr_key_size > 8 || (g.mr_mode & FI_MR_RAW))
        die_msg("provider %s wants raw MR keys (mr_key_size %zu): not supported",
                fi->fabric_attr->prov_name, fi->domain_attr->mr_key_size);
    if (opt.size > fi->ep_attr->max_msg_size)
        die_msg("--size %zu is above the provider's max_msg_size %zu", opt.size,
                fi->ep_attr->max_msg_size);
    if (fi->tx_attr->size && (size_t)opt.window > fi->tx_attr->size) opt.window = (long)fi->tx_attr->size;

    if ((rc = fi_fabric(fi->fabric_attr, &g.fabric, NULL))) die_fi("fi_fabric", rc);
    if ((rc = fi_domain(g.fabric, fi, &g.domain, NULL))) die_fi("fi_domain", rc);

    struct fi_cq_attr cq_attr;
    memset(&cq_attr, 0, sizeof cq_attr);
    cq_attr.format = FI_CQ_FORMAT_DATA;
    cq_attr.wait_obj = FI_WAIT_NONE; /* polled */
    cq_attr.size = (size_t)(4 * opt.window + 256);
    if ((rc = fi_cq_open(g.domain, &cq_attr, &g.cq, NULL))) die_fi("fi_cq_open", rc);

    struct fi_av_attr av_attr;
    memset(&av_attr, 0, sizeof av_attr);
    av_attr.type = fi->domain_attr->av_type != FI_AV_UNSPEC ? fi->domain_attr->av_type : FI_AV_TABLE;
    av_attr.count = 2;
    if ((rc = fi_av_open(g.domain, &av_attr, &g.av, NULL))) die_fi("fi_av_open", rc);

    if ((rc = fi_endpoint(g.domain, fi, &g.ep, NULL))) die_fi("fi_endpoint", rc);
    if (!strcmp(fi->fabric_attr->prov_name, "shm")) {
        /* shm names its region after the pid by default; a killed process's region
         * would then stand in the way of a later process given the same pid. A name
         * of our own: "afindep-<pid>-<random>" (the runner unlinks it if it had to
         * kill us). */
        char name[64];
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        snprintf(name, sizeof name, "afindep-%d-%08lx", (int)getpid(),
                 (unsigned long)((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20)) & 0xffffffffUL);
        if ((rc = fi_setname(&g.ep->fid, name, strlen(name) + 1))) die_fi("fi_setname", rc);
    }
    if ((rc = fi_ep_bind(g.ep, &g.av->fid, 0))) die_fi("fi_ep_bind (av)", rc);
    if ((rc = fi_ep_bind(g.ep, &g.cq->fid, FI_TRANSMIT | FI_RECV))) die_fi("fi_ep_bind (cq)", rc);
    if ((rc = fi_enable(g.ep))) die_fi("fi_enable", rc);

    /* The buffer: allocated (FI_MR_ALLOCATED), every page touched before registering. */
    g.buflen = opt.size ? opt.size : 64;
    void *mem = NULL;
    if (posix_memalign(&mem, 4096, g.buflen)) die_msg("cannot allocate %zu bytes", g.buflen);
    g.buf = mem;
    if (opt.send) {
        for (size_t i = 0; i < g.buflen; i++) g.buf[i] = pattern(i);
        if (opt.corrupt && opt.size) g.buf[opt.size / 2] ^= 0xFF;
    } else {
        memset(g.buf, 0, g.buflen);
    }
    uint64_t access = FI_WRITE | FI_REMOTE_WRITE | FI_RECV;
    uint64_t want_key = (g.mr_mode & FI_MR_PROV_KEY) ? 0 : (opt.send ? 0x5E4Du : 0x4ECFu);
    if ((rc = fi_mr_reg(g.domain, g.buf, g.buflen, access, 0, want_key, 0, &g.mr, NULL)))
        die_fi("fi_mr_reg", rc);
    if (g.mr_mode & FI_MR_ENDPOINT) {
        if ((rc = fi_mr_bind(g.mr, &g.ep->fid, 0))) die_fi("fi_mr_bind", rc);
        if ((rc = fi_mr_enable(g.mr))) die_fi("fi_mr_enable", rc);
    }
    g.desc = (g.mr_mode & FI_MR_LOCAL) ? fi_mr_desc(g.mr) : NULL;
    g.key = fi_mr_key(g.mr);
    if (g.key == FI_KEY_NOTAVAIL) die_msg("fi_mr_key: no key available for the buffer");
    g.base = (g.mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)g.buf : 0;

    /* contexts: one per write in flight, and the receives FI_RX_CQ_DATA wants posted */
    long nw = opt.window + 1;
    g.writes = calloc((size_t)nw, sizeof *g.writes);
    if (!g.writes) die_msg("out of memory");
    for (long i = 0; i < nw; i++) {
        g.writes[i].kind = OP_WRITE;
        g.writes[i].next = g.free_writes;
        g.free_writes = &g.writes[i];
    }
    if (g.rx_cq_data) {
        g.nrecv = opt.window + 16;
        if (fi->rx_attr->size && (size_t)g.nrecv > fi->rx_attr->size)
            die_msg("provider %s needs a posted receive per remote CQ data write, and its "
                    "receive queue (%zu) is smaller than --window + 16 (%ld): lower --window",
                    fi->fabric_attr->prov_name, fi->rx_attr->size, g.nrecv);
        g.recvs = calloc((size_t)g.nrecv, sizeof *g.recvs);
        if (!g.recvs) die_msg("out of memory");
        for (long i = 0; i < g.nrecv; i++) {
            g.recvs[i].kind = OP_RECV;
            if (post_recv(&g.recvs[i]))
                die_msg("fi_recv: no room for %ld receives (FI_RX_CQ_DATA): lower --window",
                        g.nrecv);
        }
    }
}

static void exchange(void) {
    uint8_t addr[MAX_ADDR];
    size_t len = sizeof addr;
    int rc = fi_getname(&g.ep->fid, addr, &len);
    if (rc) die_fi("fi_getname", rc);
    printf("INFO %s 0x%" PRIx64 " %d %ld\n", g.info->fabric_attr->prov_name, g.mr_mode,
           g.rx_cq_data, opt.window);
    hex_out("ADDR", addr, len);
    printf("MR %" PRIx64 " %" PRIx64 "\n", g.key, g.base);
    fflush(stdout);

    uint8_t peer[MAX_ADDR];
    size_t plen = 0;
    int have_addr = 0, have_mr = 0;
    char line[2 * MAX_ADDR + 64];
    while ((!have_addr || !have_mr) && fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "ADDR ", 5)) {
            const char *p = line + 5;
            plen = 0;
            while (hexval(p[0]) >= 0 && hexval(p[1]) >= 0 && plen < sizeof peer) {
                peer[plen++] = (uint8_t)(hexval(p[0]) << 4 | hexval(p[1]));
                p += 2;
            }
            if (!plen || (*p && *p != '\n')) die_msg("bad ADDR line from the peer: %s", line);
            have_addr = 1;
        } else if (!strncmp(line, "MR ", 3)) {
            if (sscanf(line + 3, "%" SCNx64 " %" SCNx64, &g.peer_key, &g.peer_base) != 2)
                die_msg("bad MR line from the peer: %s", line);
            have_mr = 1;
        }
    }
    if (!have_addr || !have_mr) die_msg("stdin ended before the peer's ADDR and MR lines");
    rc = fi_av_insert(g.av, peer, 1, &g.peer, 0, NULL);
    if (rc != 1) die_fi("fi_av_insert", rc < 0 ? rc : -FI_EINVAL);
}

/* ------------------------------------------------------------------ the runs */

static void bw(void) {
    long total = opt.warmup + opt.repeats;
    for (long r = 0; r < total; r++) {
        if (opt.send) {
            uint64_t want_ack = g.got_ack + 1;
            long posted = 0;
            double t0 = now();
            while (posted < opt.iters) {
                if (g.inflight < opt.window) {
                    post_write(opt.size, DATA_IMM);
                    posted++;
                } else if (!poll_cq()) {
                    idle("write completions");
                }
            }
            while (g.got_ack < want_ack)
                if (!poll_cq()) idle("the receiver's acknowledgement");
            double dt = now() - t0;
            drain_writes(); /* untimed: the acknowledgement says everything landed */
            if (r >= opt.warmup) printf("REP %.9f\n", dt);
        } else {
            uint64_t want = (uint64_t)(r + 1) * (uint64_t)opt.iters;
            while (g.got_data < want)
                if (!poll_cq()) idle("the sender's writes");
            if (g.got_data > want) die_msg("more writes than a repeat's (%" PRIu64 ")", g.got_data);
            post_write(0, ACK_IMM);
        }
    }
    drain_writes();
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* linear interpolation between closest ranks, q in [0, 100] */
static double percentile(const double *v, long n, double q) {
    double k = (double)(n - 1) * q / 100.0;
    long lo = (long)k;
    long hi = lo + 1 < n ? lo + 1 : n - 1;
    return v[lo] + (v[hi] - v[lo]) * (k - (double)lo);
}

static void pingpong(void) {
    long n = (opt.warmup + opt.repeats) * opt.iters, skip = opt.warmup * opt.iters;
    double *rtt = opt.send ? malloc(sizeof *rtt * (size_t)(n - skip)) : NULL;
    if (opt.send && !rtt) die_msg("out of memory");
    double sum = 0;
    for (long i = 0; i < n; i++) {
        if (opt.send) {
            while (!g.free_writes) /* outside the clock: a completion still to reap */
                if (!poll_cq()) idle("a ping to complete");
            uint64_t want = g.got_ack + 1;
            double t0 = now();
            post_write(opt.size, DATA_IMM);
            while (g.got_ack < want)
                if (!poll_cq()) idle("the pong");
            double dt = now() - t0;
            if (i >= skip) {
                rtt[i - skip] = dt;
                sum += dt;
            }
        } else {
            uint64_t want = g.got_data + 1;
            while (g.got_data < want)
                if (!poll_cq()) idle("the ping");
            post_write(opt.size, ACK_IMM);
        }
    }
    drain_writes();
    if (opt.send) {
        long m = n - skip;
        /* every timed round trip, in order, in ns (for percentiles computed elsewhere) */
        fputs("RTTS", stdout);
        for (long i = 0; i < m; i++) printf(" %.0f", rtt[i] * 1e9);
        putchar('\n');
        qsort(rtt, (size_t)m, sizeof *rtt, cmp_double);
        printf("RTT %.3f %.3f\n", percentile(rtt, m, 50) * 1e6, percentile(rtt, m, 99) * 1e6);
        printf("RTTSUM %.9f %ld\n", sum, m);
        free(rtt);
    }
}

static int verify(void) {
    for (size_t i = 0; i < opt.size; i++) {
        if (g.buf[i] != pattern(i)) {
            fprintf(stderr,
                    "af_indep (recv): verification failed: byte %zu of %zu is 0x%02x, "
                    "expected 0x%02x\n",
                    i, opt.size, g.buf[i], pattern(i));
            return 3;
        }
    }
    printf("VERIFY ok %zu\n", opt.size);
    return 0;
}

static void teardown(void) {
    int rc;
    if (g.mr && (rc = fi_close(&g.mr->fid))) die_fi("fi_close (mr)", rc);
    if (g.ep && (rc = fi_close(&g.ep->fid))) die_fi("fi_close (ep)", rc);
    if (g.av && (rc = fi_close(&g.av->fid))) die_fi("fi_close (av)", rc);
    if (g.cq && (rc = fi_close(&g.cq->fid))) die_fi("fi_close (cq)", rc);
    if (g.domain && (rc = fi_close(&g.domain->fid))) die_fi("fi_close (domain)", rc);
    if (g.fabric && (rc = fi_close(&g.fabric->fid))) die_fi("fi_close (fabric)", rc);
    fi_freeinfo(g.info);
    free(g.writes);
    free(g.recvs);
    free(g.buf);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    if (opt.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(opt.cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set))
            die_msg("sched_setaffinity(cpu %d): %s", opt.cpu, strerror(errno));
    }
    setup();
    exchange();
    if (opt.pingpong)
        pingpong();
    else
        bw();
    int status = opt.send ? 0 : verify();
    fflush(stdout);
    teardown();
    return status;
}
