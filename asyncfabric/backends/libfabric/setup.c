/* Setup: finding a provider (getinfo), opening and closing domains and
 * engines, adding peers, registering memory, and what Python reads about an
 * open engine (afe_dominfo, afe_getname, afe_stats). */
#include "afint.h"

#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <sys/uio.h>

static void seterr(char *err, size_t errlen, const char *fmt, const char *a, int rc) {
    if (err && errlen) snprintf(err, errlen, fmt, a, rc, fi_strerror(rc < 0 ? -rc : rc));
}

const char *afe_strerror(int err) { return fi_strerror(err < 0 ? -err : err); }

static struct fi_info *make_hints(const char *prov, int want_hmem) {
    struct fi_info *h = fi_allocinfo();
    if (!h) return NULL;
    h->caps = FI_MSG | FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
    if (want_hmem) h->caps |= FI_HMEM;
    h->mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA;
    h->ep_attr->type = FI_EP_RDM;
    h->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY |
                              FI_MR_ENDPOINT | (want_hmem ? FI_MR_HMEM : 0);
    h->domain_attr->threading = FI_THREAD_DOMAIN;
    h->domain_attr->cq_data_size = 4;
    h->fabric_attr->prov_name = strdup(prov);
    if (!strcmp(prov, "tcp")) h->tx_attr->op_flags = FI_DELIVERY_COMPLETE;
    return h;
}

static int getinfo(const char *prov, const char *node, int want_hmem, struct fi_info **out,
                   char *err, size_t errlen) {
    af_quirks_init(); /* before the process's first fi_getinfo */
    struct fi_info *h = make_hints(prov, want_hmem);
    if (!h) return -FI_ENOMEM;
    int rc = fi_getinfo(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), node, NULL,
                        node ? FI_SOURCE : 0, h, out);
    fi_freeinfo(h);
    if (rc) {
        seterr(err, errlen, "libfabric has no usable '%s' provider here (fi_getinfo: %d, %s)", prov, rc);
        return rc;
    }
    if ((*out)->domain_attr->cq_data_size < 4) {
        seterr(err, errlen, "provider '%s' carries fewer than 4 bytes of CQ data (%d): %s", prov,
               (int)(*out)->domain_attr->cq_data_size);
        fi_freeinfo(*out);
        *out = NULL;
        return -FI_ENODATA;
    }
    return 0;
}

int afe_probe(const char *prov, const char *node, char *err, size_t errlen) {
    struct fi_info *info = NULL;
    int rc = getinfo(prov, node, 0, &info, err, errlen);
    if (info) fi_freeinfo(info);
    return rc;
}

static uint64_t rand64(void) {
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, 0) != sizeof v) v = now_ns() * 0x9E3779B97F4A7C15ull;
    return v;
}

/* Register one buffer in one domain, choosing an unguessable key where the
 * provider lets us, and binding it to the endpoint where it must be. */
static int reg_one(af_dom *d, void *addr, uint64_t len, uint64_t access, int iface, uint64_t device,
                   struct fid_mr **mr) {
    struct iovec iov = {addr, len};
    struct fi_mr_attr attr;
    int rc = -FI_ENOKEY;
    for (int tries = 0; tries < 8 && rc == -FI_ENOKEY; tries++) {
        memset(&attr, 0, sizeof attr);
        attr.mr_iov = &iov;
        attr.iov_count = 1;
        attr.access = access;
        attr.iface = (enum fi_hmem_iface)iface;
        if (iface == FI_HMEM_CUDA) attr.device.cuda = (int)device;
        if (!(d->mr_mode & FI_MR_PROV_KEY)) {
            uint64_t k = rand64();
            if (d->key_size && d->key_size < 8) k &= (1ull << (8 * d->key_size)) - 1;
            attr.requested_key = k;
        }
        rc = fi_mr_regattr(d->domain, &attr, 0, mr);
    }
    if (rc) return rc;
    if (d->mr_mode & FI_MR_ENDPOINT) {
        rc = fi_mr_bind(*mr, &d->ep->fid, 0);
        if (!rc) rc = fi_mr_enable(*mr);
        if (rc) {
            fi_close(&(*mr)->fid);
            *mr = NULL;
        }
    }
    return rc;
}

static int open_dom(af_engine *e, af_dom *d, struct fi_info *info, int is_ctrl, uint32_t rx_slots,
                    char *err, size_t errlen) {
    int rc;
    const char *prov = info->fabric_attr->prov_name;
    af_quirks q = af_quirks_for(prov);
    d->wait_fd = -1;
    d->info = fi_dupinfo(info);
    if (!d->info) return -FI_ENOMEM;
    d->max_msg = info->ep_attr->max_msg_size;
    d->inject = q.no_inject ? 0 : info->tx_attr->inject_size; /* tcp: quirks.c says why */
    d->mr_mode = info->domain_attr->mr_mode;
    d->key_size = info->domain_attr->mr_key_size;
    d->rx_cq_data = (info->mode & FI_RX_CQ_DATA) != 0;
    d->owe_head = d->owe_tail = AF_NONE;
    d->checked_plain = q.plain_unchecked;
    d->sender_copy = 0;
    const char *sc = getenv("ASYNCFABRIC_SHM_SENDER_COPY");
    if (q.sender_copy && !(info->caps & FI_HMEM) && sc && *sc) {
        /* Off unless asked for (it bypasses the target's key check): N >= 1
         * turns it on for pieces of at least N bytes and more than an inject. */
        uint64_t min = strtoull(sc, NULL, 10);
        d->sender_copy = min ? (min > d->inject ? min : d->inject + 1) : 0;
        if (d->sender_copy) d->checked_plain = 0; /* trusted peers: plain RMA copies fast too */
    }
    const char *dc = getenv("ASYNCFABRIC_SHM_DIRECT_COPY"); /* cma.c; "0": libfabric's copy */
    d->direct_copy = d->sender_copy && !(dc && !strcmp(dc, "0"));

    if ((rc = fi_fabric(info->fabric_attr, &d->fabric, NULL))) goto fail_fabric;
    if ((rc = fi_domain(d->fabric, info, &d->domain, NULL))) goto fail_domain;

    uint32_t txs = info->tx_attr->size ? (uint32_t)info->tx_attr->size : 256;
    d->nwr = txs < 1024 ? txs : 1024;
    d->credits = d->nwr;
    d->wrs = calloc(d->nwr, sizeof(af_wr));
    if (!d->wrs) return -FI_ENOMEM;
    for (uint32_t i = 0; i < d->nwr; i++) {
        d->wrs[i].tag = TAG_TX;
        d->wrs[i].next_free = i + 1 < d->nwr ? i + 1 : AF_NONE;
    }
    d->wr_free = 0;

    uint32_t rxs = info->rx_attr->size ? (uint32_t)info->rx_attr->size : 256;
    d->nrx = rx_slots < rxs ? rx_slots : rxs;

    struct fi_cq_attr cq_attr;
    memset(&cq_attr, 0, sizeof cq_attr);
    cq_attr.format = FI_CQ_FORMAT_DATA;
    cq_attr.size = (size_t)d->nwr + d->nrx + 64;
    cq_attr.wait_obj = FI_WAIT_FD;
    if (fi_cq_open(d->domain, &cq_attr, &d->cq, NULL)) {
        /* No fd to sleep on: the progress thread sleeps by the clock instead. */
        cq_attr.wait_obj = FI_WAIT_NONE;
        if ((rc = fi_cq_open(d->domain, &cq_attr, &d->cq, NULL))) goto fail_cq;
    } else if (fi_control(&d->cq->fid, FI_GETWAIT, &d->wait_fd)) {
        d->wait_fd = -1;
    }

    struct fi_av_attr av_attr;
    memset(&av_attr, 0, sizeof av_attr);
    av_attr.type = FI_AV_TABLE;
    if ((rc = fi_av_open(d->domain, &av_attr, &d->av, NULL))) goto fail_av;
    if ((rc = fi_endpoint(d->domain, info, &d->ep, NULL))) goto fail_ep;
    char name[64] = "";
    if (q.own_name) {
        /* A region name of our own (shm): shmname.h says why. */
        af_shm_name(name, sizeof name, rand64());
        if ((rc = fi_setname(&d->ep->fid, name, strlen(name) + 1))) goto fail_ep;
    }
    if ((rc = fi_ep_bind(d->ep, &d->av->fid, 0))) goto fail_ep;
    if ((rc = fi_ep_bind(d->ep, &d->cq->fid, FI_TRANSMIT | FI_RECV))) goto fail_ep;
    if ((rc = fi_enable(d->ep))) goto fail_ep;
    if (q.own_name) { /* the region exists now: guard its lock (qlock.h) */
        int32_t self = (int32_t)getpid();
        d->own_qlock = qlock_map(name, sizeof name, &self, &d->own_qmap);
    }

    /* Receive pool. On FI_MR_LOCAL providers the pools are registered once. */
    size_t rxbytes = (size_t)d->nrx * e->ctrl_max;
    if (posix_memalign((void **)&d->rxmem, 4096, rxbytes ? rxbytes : 4096)) return -FI_ENOMEM;
    d->rx = calloc(d->nrx ? d->nrx : 1, sizeof(af_rx));
    if (!d->rx) return -FI_ENOMEM;
    if (d->mr_mode & FI_MR_LOCAL) {
        if ((rc = reg_one(d, d->rxmem, rxbytes, FI_RECV, FI_HMEM_SYSTEM, 0, &d->rx_mr))) goto fail_mr;
        d->rx_desc = fi_mr_desc(d->rx_mr);
    }
    for (uint32_t i = 0; i < d->nrx; i++) {
        d->rx[i].tag = TAG_RX;
        d->rx[i].slot = i;
        d->rx[i].buf = d->rxmem + (size_t)i * e->ctrl_max;
        post_rx(e, d, &d->rx[i]); /* a failure is retried by progress */
    }
    if (is_ctrl) {
        d->ntx = 64;
        size_t txbytes = (size_t)d->ntx * e->ctrl_max;
        if (posix_memalign((void **)&d->txmem, 4096, txbytes)) return -FI_ENOMEM;
        d->tx_free = calloc((size_t)d->ntx, sizeof(int32_t));
        if (!d->tx_free) return -FI_ENOMEM;
        for (int32_t i = 0; i < d->ntx; i++) d->tx_free[i] = i;
        d->tx_top = d->ntx;
        if (d->mr_mode & FI_MR_LOCAL) {
            if ((rc = reg_one(d, d->txmem, txbytes, FI_SEND, FI_HMEM_SYSTEM, 0, &d->tx_mr))) goto fail_mr;
            d->tx_desc = fi_mr_desc(d->tx_mr);
        }
    }
    return 0;

fail_fabric:
    seterr(err, errlen, "fi_fabric failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_domain:
    seterr(err, errlen, "fi_domain failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_cq:
    seterr(err, errlen, "fi_cq_open failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_av:
    seterr(err, errlen, "fi_av_open failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_ep:
    seterr(err, errlen, "opening the endpoint failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_mr:
    seterr(err, errlen, "registering the message pools failed for provider '%s': %d (%s)", prov, rc);
    return rc;
}

static void close_dom(af_dom *d) {
    qlock_unmap(d->own_qmap);
    if (d->ep) fi_close(&d->ep->fid);
    if (d->rx_mr) fi_close(&d->rx_mr->fid);
    if (d->tx_mr) fi_close(&d->tx_mr->fid);
    if (d->av) fi_close(&d->av->fid);
    if (d->cq) fi_close(&d->cq->fid);
    if (d->domain) fi_close(&d->domain->fid);
    if (d->fabric) fi_close(&d->fabric->fid);
    if (d->info) fi_freeinfo(d->info);
    free(d->wrs);
    free(d->rx);
    free(d->rxmem);
    free(d->txmem);
    free(d->tx_free);
    memset(d, 0, sizeof *d);
}

int afe_open(const char *prov, const char *node, int ndom, uint32_t ctrl_max, uint32_t rx_slots,
             int want_hmem, af_engine **out, char *err, size_t errlen) {
    *out = NULL;
    if (ndom < 1 || ndom > AF_MAX_DOMS) {
        if (err) snprintf(err, errlen, "domains must be between 1 and %d, got %d", AF_MAX_DOMS, ndom);
        return -FI_EINVAL;
    }
    struct fi_info *infos = NULL;
    int rc = getinfo(prov, node, want_hmem, &infos, err, errlen);
    if (rc) return rc;

    /* Distinct domains (NICs) in the order the provider lists them; with fewer
     * NICs than asked for, domains share a NIC, as on loopback. */
    struct fi_info *distinct[AF_MAX_DOMS];
    int ndistinct = 0;
    for (struct fi_info *i = infos; i && ndistinct < AF_MAX_DOMS; i = i->next) {
        int seen = 0;
        for (int j = 0; j < ndistinct; j++)
            if (!strcmp(distinct[j]->domain_attr->name, i->domain_attr->name) &&
                !strcmp(distinct[j]->fabric_attr->prov_name, i->fabric_attr->prov_name))
                seen = 1;
        if (!seen) distinct[ndistinct++] = i;
    }

    af_engine *e = calloc(1, sizeof *e);
    if (!e) {
        fi_freeinfo(infos);
        return -FI_ENOMEM;
    }
    pthread_mutex_init(&e->lock, NULL);
    for (int d = 0; d < AF_MAX_DOMS; d++) pthread_mutex_init(&e->dom[d].lock, NULL);
    e->ctrl_max = ctrl_max;
    e->ndom = ndom;
    e->op_free = AF_NONE;
    e->pend_head = e->pend_tail = AF_NONE;
    e->mr_free = -1;
    e->ctr_cap = 1024;
    e->ctr = calloc(e->ctr_cap, sizeof(af_ctr));
    e->ev_cap = 1024;
    e->ev = malloc(sizeof(af_event) * e->ev_cap);
    e->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->bell_fd = -1;
    e->watch_fd = -1;
    e->need_min = UINT64_MAX;
    if (!e->ctr || !e->ev || e->notify_fd < 0 || e->wake_fd < 0) {
        rc = -FI_ENOMEM;
        if (err) snprintf(err, errlen, "out of memory or file descriptors opening the engine");
        goto fail;
    }
    if (af_quirks_for(distinct[0]->fabric_attr->prov_name).sweep_shm) af_shm_sweep();
    for (int i = 0; i < ndom; i++) {
        pthread_mutex_lock(&e->lock);
        rc = open_dom(e, &e->dom[i], distinct[i % ndistinct], i == 0, rx_slots, err, errlen);
        pthread_mutex_unlock(&e->lock);
        if (rc) goto fail;
    }
    {
        char name[1024];
        size_t len = sizeof name;
        if (fi_getname(&e->dom[0].ep->fid, name, &len) == 0 &&
            bell_create(bell_hash(name, len), (uint32_t)af_pidns(), &e->bell_page, &e->bell_fd, e->bell_name,
                        sizeof e->bell_name)) {
            e->bell_page = NULL;
            e->bell_fd = -1;
        }
    }
    e->all_local = 1;
    for (int i = 0; i < ndom; i++)
        if (!af_quirks_for(e->dom[i].info->fabric_attr->prov_name).host_only) e->all_local = 0;
    fi_freeinfo(infos);
    e->opened = 1;
    *out = e;
    return 0;
fail:
    fi_freeinfo(infos);
    afe_close(e);
    return rc;
}

int afe_dominfo(af_engine *e, int i, af_dominfo *out) {
    if (i < 0 || i >= e->ndom) return -FI_EINVAL;
    af_dom *d = &e->dom[i];
    memset(out, 0, sizeof *out);
    snprintf(out->provider, sizeof out->provider, "%s", d->info->fabric_attr->prov_name);
    snprintf(out->fabric, sizeof out->fabric, "%s", d->info->fabric_attr->name);
    snprintf(out->domain, sizeof out->domain, "%s", d->info->domain_attr->name);
    out->max_msg_size = d->max_msg;
    out->inject_size = d->inject;
    out->cq_data_size = d->info->domain_attr->cq_data_size;
    out->mr_mode = d->mr_mode;
    out->mr_key_size = d->key_size;
    out->tx_credits = d->nwr;
    out->rx_slots = d->nrx;
    out->wait_fd = d->wait_fd;
    out->rx_cq_data = d->rx_cq_data;
    return 0;
}

int afe_getname(af_engine *e, int i, void *buf, size_t *len) {
    if (i < 0 || i >= e->ndom) return -FI_EINVAL;
    pthread_mutex_lock(&e->lock);
    int rc = fi_getname(&e->dom[i].ep->fid, buf, len);
    pthread_mutex_unlock(&e->lock);
    return rc;
}

int afe_add_peer(af_engine *e, int ndom, const void *const *addrs, size_t addr_len0,
                 int64_t *out_peer) {
    if (ndom < 1 || ndom > e->ndom) return -FI_EINVAL;
    enter_py(e);
    int rc = 0;
    if (e->npeers == e->cap_peers) {
        uint32_t ncap = e->cap_peers ? e->cap_peers * 2 : 64;
        af_peer *n = realloc(e->peers, sizeof(af_peer) * ncap);
        if (!n) rc = -FI_ENOMEM;
        else {
            e->peers = n;
            e->cap_peers = ncap;
        }
    }
    if (!rc) {
        af_peer *p = &e->peers[e->npeers];
        memset(p, 0, sizeof *p);
        for (int d = 0; d < AF_MAX_DOMS; d++) p->addr[d] = FI_ADDR_NOTAVAIL;
        p->pidfd = -1;
        p->pid = 0;
        p->dead = 0;
        p->inflight = 0;
        p->t_progress = 0;
        int32_t qpid = 0;
        for (int d = 0; d < ndom && !rc; d++) {
            dom_lock(e, &e->dom[d]);
            int n = fi_av_insert(e->dom[d].av, addrs[d], 1, &p->addr[d], 0, NULL);
            dom_unlock(e, &e->dom[d]);
            if (n != 1) rc = n < 0 ? n : -FI_EADDRNOTAVAIL;
            else if (e->dom[d].own_qlock) /* its region's lock, looked at before each post (qlock.h) */
                p->qlock[d] = qlock_map(addrs[d], addr_len0, &qpid, &p->qmap[d]);
        }
        p->qpid = rc ? 0 : qpid;
        if (rc)
            for (int d = 0; d < ndom; d++) qlock_unmap(p->qmap[d]);
        if (!rc) {
            bell_open_peer(bell_hash(addrs[0], addr_len0), &p->bell);
            *out_peer = e->npeers++;
        }
    }
    leave_py(e);
    return rc;
}

int afe_mr_reg(af_engine *e, void *addr, uint64_t len, uint64_t access, int iface, uint64_t device,
               uint64_t *keys, uint64_t *bases) {
    uint64_t fa = FI_READ | FI_WRITE | FI_SEND | FI_RECV;
    if (access & AF_ACCESS_REMOTE_WRITE) fa |= FI_REMOTE_WRITE;
    if (access & AF_ACCESS_REMOTE_READ) fa |= FI_REMOTE_READ;
    enter_py(e);
    int rc = 0, idx = -1;
    if (e->mr_free >= 0) {
        idx = e->mr_free;
        e->mr_free = e->mrs[idx].next_free;
    } else {
        if (e->nmrs == e->cap_mrs) {
            int ncap = e->cap_mrs ? e->cap_mrs * 2 : 64;
            af_mr *n = realloc(e->mrs, sizeof(af_mr) * (size_t)ncap);
            if (!n) rc = -FI_ENOMEM;
            else {
                e->mrs = n;
                e->cap_mrs = ncap;
            }
        }
        if (!rc) idx = e->nmrs++;
    }
    if (!rc) {
        af_mr *m = &e->mrs[idx];
        memset(m, 0, sizeof *m);
        for (int d = 0; d < e->ndom && !rc; d++) {
            af_dom *dm = &e->dom[d];
            dom_lock(e, dm);
            rc = reg_one(dm, addr, len, fa, iface, device, &m->mr[d]);
            dom_unlock(e, dm);
            if (rc) break;
            m->desc[d] = fi_mr_desc(m->mr[d]);
            keys[d] = fi_mr_key(m->mr[d]);
            bases[d] = (dm->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)addr : 0;
        }
        if (rc) {
            for (int d = 0; d < e->ndom; d++)
                if (m->mr[d]) fi_close(&m->mr[d]->fid);
            m->next_free = e->mr_free;
            e->mr_free = idx;
        } else {
            m->live = 1;
            m->iface = iface;
        }
    }
    leave_py(e);
    return rc ? rc : idx;
}

int afe_mr_close(af_engine *e, int idx) {
    enter_py(e);
    int rc = -FI_EINVAL;
    if (idx >= 0 && idx < e->nmrs && e->mrs[idx].live) {
        af_mr *m = &e->mrs[idx];
        rc = 0;
        for (int d = 0; d < e->ndom; d++) {
            if (m->mr[d]) {
                dom_lock(e, &e->dom[d]);
                int r = fi_close(&m->mr[d]->fid);
                dom_unlock(e, &e->dom[d]);
                if (r && !rc) rc = r;
            }
            m->mr[d] = NULL;
        }
        m->live = 0;
        m->next_free = e->mr_free;
        e->mr_free = idx;
    }
    leave_py(e);
    return rc;
}

void afe_close(af_engine *e) {
    if (!e) return;
    trig_stop(e); /* triggers.c: no armed word is watched or stored into from here on */
    if (e->started) {
        atomic_store(&e->stop, 1);
        kick(e);
        if (e->nworkers > 1) workers_stop(e);
        else pthread_join(e->thr, NULL);
        e->started = 0;
    }
    e->nworkers = 0; /* one thread again (this one): no domain locks from here on */
    /* Let providers finish handling connection events (a peer that died, a
     * shutdown in flight) before their endpoints go: rxm in libfabric 1.17 can
     * crash closing an endpoint with such events unread. Not after a failed
     * open: nothing was connected, and progressing an endpoint that never got
     * enabled crashes shm (its CQ polls a region that does not exist). */
    if (e->opened) {
        uint64_t t0 = now_ns();
        pthread_mutex_lock(&e->lock);
        e->py_ctx = 1;
        while (now_ns() - t0 < 20000000ull) progress_locked(e);
        e->py_ctx = 0;
        pthread_mutex_unlock(&e->lock);
    }
    for (int i = 0; i < e->nmrs; i++)
        for (int d = 0; d < e->ndom; d++)
            if (e->mrs[i].live && e->mrs[i].mr[d]) fi_close(&e->mrs[i].mr[d]->fid);
    for (int i = 0; i < AF_MAX_DOMS; i++) close_dom(&e->dom[i]);
    for (uint32_t i = 0; i < e->cap_ops; i++)
        if (e->ops[i].active) {
            free(e->ops[i].offs);
            free(e->ops[i].msg);
        }
    free(e->ops);
    for (uint32_t i = 0; i < e->npeers; i++) bell_close_peer(&e->peers[i].bell);
    peer_close_all(e);
    free(e->peers);
    bell_destroy(e->bell_page, e->bell_fd, e->bell_name);
    free(e->mrs);
    free(e->ctr);
    free(e->ev);
    if (e->notify_fd >= 0) close(e->notify_fd);
    if (e->wake_fd >= 0) close(e->wake_fd);
    pthread_mutex_destroy(&e->lock);
    for (int d = 0; d < AF_MAX_DOMS; d++) pthread_mutex_destroy(&e->dom[d].lock);
    free(e);
}

void afe_stats(af_engine *e, af_stats *out) {
    pthread_mutex_lock(&e->lock);
    *out = e->st;
    out->live_ops = e->live_ops;
    uint64_t live = 0;
    for (int i = 0; i < e->nmrs; i++) live += e->mrs[i].live ? 1 : 0;
    out->live_mrs = live;
    pthread_mutex_unlock(&e->lock);
}
