/*
 * rusage-run OUTFILE CMD [ARG...]: run CMD, write its peak RSS (KiB) to OUTFILE,
 * exit with its status.
 *
 * Why not measure from Python: ru_maxrss survives exec(), so a child forked
 * from the bench starts with the bench's own RSS as its peak. Forked from this
 * small program instead, a command's figure is its own (floor: this helper's
 * RSS, well under 1 MiB).
 */
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: rusage-run OUTFILE CMD [ARG...]\n");
        return 127;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 127;
    }
    if (pid == 0) {
        /* die with the helper, which dies with the bench */
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        execvp(argv[2], argv + 2);
        perror(argv[2]);
        _exit(127);
    }
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0) {
        perror("wait4");
        return 127;
    }
    FILE *out = fopen(argv[1], "w");
    if (out == NULL) {
        perror(argv[1]);
        return 127;
    }
    fprintf(out, "%ld\n", ru.ru_maxrss);
    fclose(out);
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}
