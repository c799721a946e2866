/*
 * The benchmark workload: N rounds of create (open O_CREAT) + write + close, chmod,
 * rename, unlink in the current directory.  Prints the time the rounds took, in ns,
 * so process start-up is not part of the measurement.
 *
 * usage: workload ROUNDS
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s ROUNDS\n", argv[0]);
        return 2;
    }
    long rounds = atol(argv[1]);
    char name[32], moved[32];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < rounds; i++) {
        snprintf(name, sizeof(name), "f%ld", i);
        snprintf(moved, sizeof(moved), "g%ld", i);
        int fd = open(name, O_CREAT | O_WRONLY | O_TRUNC, 0644);
        if (fd < 0 || write(fd, "x", 1) != 1 || close(fd) != 0)
            return 1;
        if (chmod(name, 0600) || rename(name, moved) || unlink(moved))
            return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%lld\n", (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL
                     + (t1.tv_nsec - t0.tv_nsec));
    return 0;
}
