/* Open-loop FastAGI load generator for bench/agi_authorize.py (--client c).
 *
 * Why C: the Python generator (asyncio + a ticker thread) costs about half a core at 1,000
 * sessions/s on this 2-core machine and adds its own scheduling delays to every latency, so
 * its figures were the floor of the generator as much as of the server. This one is a single
 * epoll loop: request i is due at t0 + i/rate whatever happened to the earlier ones; at its due
 * time it opens a TCP connection, writes the agi_* header block Asterisk 20 sends, answers every
 * SET VARIABLE with "200 result=1", and at the server's close (EOF) records the latency from the
 * DUE time (the generator's lateness included) and writes res_agi.c's last "HANGUP".
 *
 * Usage: agi_load HOST PORT RATE SECONDS TAG ACCOUNTS TIMEOUT_S
 * Output, one line per request in request order:
 *   ok LATENCY_NS SEND_LAG_NS END_NS   the three variables were set, ALLOW with MAXSEC > 0 (END_NS:
 *                                      the close, after t0)
 *   err REASON                     anything else (REASON has no spaces)
 * then "cpu SECONDS" (this process's CPU time for the run).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { HDR_MAX = 2048, BUF_MAX = 4096 };

typedef struct {
    int fd;
    int state; /* 0 idle, 1 connecting, 2 talking, 3 done */
    long long due, sent_at, end;
    char buf[BUF_MAX];
    int len;
    int have_auth, have_reason, have_maxsec, allow, maxsec_ok;
    const char *err;
} Req;

static const char *NUMBERS[] = {"0212345678", "0311234567", "0721234567", "0744123456", "0040212345678"};

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int header(char *out, const char *host, int port, long i, int tag, int accounts) {
    char account[32], uniqueid[48], channel[48];
    const char *number = NUMBERS[i % 5];
    snprintf(account, sizeof account, "bench%05ld", i % accounts);
    snprintf(uniqueid, sizeof uniqueid, "%d.%ld", 1718000000 + tag, i);
    snprintf(channel, sizeof channel, "PJSIP/100-%08lx", (long)tag * 100000L + i);
    return snprintf(out, HDR_MAX,
        "agi_network: yes\nagi_network_script: authorize\nagi_request: agi://%s:%d/authorize\n"
        "agi_channel: %s\nagi_language: ro\nagi_type: PJSIP\nagi_uniqueid: %s\nagi_version: 20.8.1\n"
        "agi_callerid: 100\nagi_calleridname: Birou 100\nagi_callingpres: 0\nagi_callingani2: 0\n"
        "agi_callington: 0\nagi_callingtns: 0\nagi_dnid: %s\nagi_rdnis: unknown\nagi_context: clickphone-outbound\n"
        "agi_extension: %s\nagi_priority: 9\nagi_enhanced: 0.0\nagi_accountcode: %s\nagi_threadid: 140000000000000\n"
        "agi_arg_1: %s\nagi_arg_2: %s\nagi_arg_3: %s\n\n",
        host, port, channel, uniqueid, number, number, account, account, number, host);
}

static void finish(Req *r, int epfd, const char *err) {
    if (r->state == 3) return;
    if (!err) {
        if (!(r->have_auth && r->have_reason && r->have_maxsec)) err = r->have_auth ? "incomplete_reply" : "closed_before_any_command";
        else if (!r->allow || !r->maxsec_ok) err = "denied";
    }
    r->err = err;
    r->end = now_ns();
    if (r->fd >= 0) {
        if (!err) (void)!write(r->fd, "HANGUP\n", 7);
        epoll_ctl(epfd, EPOLL_CTL_DEL, r->fd, NULL);
        close(r->fd);
        r->fd = -1;
    }
    r->state = 3;
}

static void on_line(Req *r, char *line) {
    /* SET VARIABLE NAME VALUE */
    if (strncmp(line, "SET VARIABLE ", 13) == 0) {
        char *name = line + 13, *value = strchr(name, ' ');
        if (value) {
            *value++ = 0;
            size_t vl = strlen(value);
            if (vl >= 2 && value[0] == '"' && value[vl - 1] == '"') { value[vl - 1] = 0; value++; }
            if (!strcmp(name, "CLICKPHONE_AUTH")) { r->have_auth = 1; r->allow = !strcmp(value, "ALLOW"); }
            else if (!strcmp(name, "CLICKPHONE_REASON")) r->have_reason = 1;
            else if (!strcmp(name, "CLICKPHONE_MAXSEC")) { r->have_maxsec = 1; r->maxsec_ok = atol(value) > 0; }
        }
        (void)!write(r->fd, "200 result=1\n", 13);
    } else {
        (void)!write(r->fd, "510 Invalid or unknown command\n", 31);
    }
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT RATE SECONDS TAG ACCOUNTS TIMEOUT_S\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    double rate = atof(argv[3]), seconds = atof(argv[4]);
    int tag = atoi(argv[5]), accounts = atoi(argv[6]);
    long long timeout = (long long)(atof(argv[7]) * 1e9);
    long n = (long)(rate * seconds + 0.5);
    if (n < 1) n = 1;
    Req *reqs = calloc((size_t)n, sizeof(Req));
    char (*headers)[HDR_MAX] = malloc((size_t)n * HDR_MAX);
    int *hlen = malloc((size_t)n * sizeof(int));
    if (!reqs || !headers || !hlen) return 1;
    for (long i = 0; i < n; i++) {
        hlen[i] = header(headers[i], host, port, i, tag, accounts);
        reqs[i].fd = -1;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    int epfd = epoll_create1(0);
    struct epoll_event evs[256];
    long long t0 = now_ns() + 50000000LL;
    long next = 0, done = 0, oldest = 0;
    while (done < n) {
        long long now = now_ns();
        while (next < n && t0 + (long long)(next * 1e9 / rate) <= now) {
            Req *r = &reqs[next];
            r->due = t0 + (long long)(next * 1e9 / rate);
            r->sent_at = now_ns();
            r->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            int one = 1;
            setsockopt(r->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            int rc = connect(r->fd, (struct sockaddr *)&addr, sizeof addr);
            if (rc < 0 && errno != EINPROGRESS) {
                finish(r, epfd, "connect_failed");
                done++;
            } else {
                r->state = 1;
                struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u64 = (unsigned long)next};
                epoll_ctl(epfd, EPOLL_CTL_ADD, r->fd, &ev);
            }
            next++;
        }
        /* wait for I/O until the next due time, to the nanosecond (epoll_pwait2, Linux 5.11) */
        struct timespec wait = {0, 1000000};
        if (next < n) {
            long long until = t0 + (long long)(next * 1e9 / rate) - now_ns();
            wait.tv_sec = until <= 0 ? 0 : until / 1000000000LL;
            wait.tv_nsec = until <= 0 ? 0 : until % 1000000000LL;
        }
        int k = epoll_pwait2(epfd, evs, 256, &wait, NULL);
        for (int e = 0; e < k; e++) {
            Req *r = &reqs[evs[e].data.u64];
            if (r->state == 3) continue;
            if (r->state == 1 && (evs[e].events & EPOLLOUT)) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(r->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) { finish(r, epfd, "connect_refused"); done++; continue; }
                long idx = (long)evs[e].data.u64;
                (void)!write(r->fd, headers[idx], (size_t)hlen[idx]);
                r->state = 2;
                struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = evs[e].data.u64};
                epoll_ctl(epfd, EPOLL_CTL_MOD, r->fd, &ev);
            }
            if (evs[e].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                for (;;) {
                    ssize_t got = read(r->fd, r->buf + r->len, (size_t)(BUF_MAX - 1 - r->len));
                    if (got > 0) {
                        r->len += (int)got;
                        r->buf[r->len] = 0;
                        char *start = r->buf, *nl;
                        while ((nl = strchr(start, '\n'))) {
                            *nl = 0;
                            on_line(r, start);
                            start = nl + 1;
                        }
                        r->len = (int)(r->buf + r->len - start);
                        memmove(r->buf, start, (size_t)r->len);
                        if (r->len >= BUF_MAX - 1) { finish(r, epfd, "line_too_long"); done++; break; }
                        continue;
                    }
                    if (got == 0) { finish(r, epfd, NULL); done++; }
                    else if (errno != EAGAIN) { finish(r, epfd, "read_error"); done++; }
                    break;
                }
            }
        }
        /* timeouts: due times grow with i, so stop at the first unfinished one still in time */
        now = now_ns();
        while (oldest < next && reqs[oldest].state == 3) oldest++;
        for (long i = oldest; i < next; i++) {
            if (reqs[i].state == 3) continue;
            if (now - reqs[i].due <= timeout) break;
            finish(&reqs[i], epfd, "client_timeout");
            done++;
        }
    }
    for (long i = 0; i < n; i++) {
        if (reqs[i].err) printf("err %s\n", reqs[i].err);
        else printf("ok %lld %lld %lld\n", reqs[i].end - reqs[i].due, reqs[i].sent_at - reqs[i].due, reqs[i].end - t0);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("cpu %.6f\n", ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
    return 0;
}
