/*
 * benches/null_server.c -- the load generator's ceiling for `scripts/bench`
 * (GET and SET) and `scripts/bench cache` part (a): a RESP server that does
 * no work. It answers every complete request with "$3\r\nxxx\r\n" (what
 * redis-benchmark -t get reads back for its default 3-byte value; it does
 * not check SET's reply): one thread, epoll, one read per readable socket
 * and, once all ready sockets are read, one write per socket owed replies
 * (as Redis writes its replies before it sleeps again). It shows how fast redis-benchmark goes
 * when the server's work costs nothing but its wake-ups and syscalls.
 *
 * Usage: null_server PORT [spin]
 *   spin: poll epoll without sleeping (epoll_wait timeout 0), so a client's
 *   write never has to wake this server; a sleeping server makes every
 *   client write pay a wake-up, which costs the client CPU.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 65536
#define BUF (1 << 16)

static char *inbuf[MAXC];
static int inlen[MAXC];
/* Replies owed per socket, and the sockets owed any, this round. */
static int owed[MAXC];
static int pend[256];
static int np;

/* Count the complete RESP arrays at the start of b[0..len); return the
 * bytes they take. */
static int scan(const char *b, int len, int *n) {
    int p = 0;
    *n = 0;
    for (;;) {
        int q = p;
        if (q >= len || b[q] != '*') return p;
        const char *e = memchr(b + q, '\n', len - q);
        if (!e) return p;
        int args = atoi(b + q + 1);
        q = e - b + 1;
        for (int i = 0; i < args; i++) {
            if (q >= len) return p;
            e = memchr(b + q, '\n', len - q);
            if (!e) return p;
            int l = atoi(b + q + 1);
            q = e - b + 1 + l + 2;
            if (q > len) return p;
        }
        p = q;
        (*n)++;
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: null_server PORT [spin]\n");
        return 2;
    }
    int timeout = (argc > 2 && strcmp(argv[2], "spin") == 0) ? 0 : -1;
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[1]));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1024)) {
        perror("null_server: bind");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char out[BUF / 4 * 9];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, timeout);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c = accept(ls, 0, 0);
                if (c < 0) continue;
                if (c >= MAXC) {
                    close(c);
                    continue;
                }
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                if (!inbuf[c]) inbuf[c] = malloc(BUF);
                inlen[c] = 0;
                ev.events = EPOLLIN;
                ev.data.fd = c;
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                continue;
            }
            int got = read(fd, inbuf[fd] + inlen[fd], BUF - inlen[fd]);
            if (got <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, 0);
                close(fd);
                continue;
            }
            inlen[fd] += got;
            int k, used = scan(inbuf[fd], inlen[fd], &k);
            if (used == 0 && inlen[fd] == BUF) { /* one request over 64 KiB: not this server's job */
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, 0);
                close(fd);
                continue;
            }
            memmove(inbuf[fd], inbuf[fd] + used, inlen[fd] - used);
            inlen[fd] -= used;
            if (k && !owed[fd]) pend[np++] = fd;
            owed[fd] += k;
        }
        /* Replies go out after every ready socket was read: the client
         * finds more of them ready at once. */
        for (int i = 0; i < np; i++) {
            int fd = pend[i];
            while (owed[fd] > 0) {
                int k = owed[fd] < BUF / 4 ? owed[fd] : BUF / 4, o = 0;
                for (int j = 0; j < k; j++, o += 9) memcpy(out + o, "$3\r\nxxx\r\n", 9);
                owed[fd] -= k;
                if (write(fd, out, o) < 0) {
                    owed[fd] = 0;
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, 0);
                    close(fd);
                }
            }
        }
        np = 0;
    }
}
