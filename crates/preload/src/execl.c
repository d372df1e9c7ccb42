/* execl, execlp and execle take the new program's arguments as a variadic
 * list, which stable Rust cannot receive. These gather the list into an
 * array, as glibc's own do, and call execv, execvp and execve: the
 * library's hooks (hooks.rs), so that connections cross these execs too.
 * The exported execl, execlp and execle are jumps to these (hooks.rs). */

#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

/* How many arguments there are, `first` included, before the NULL that
 * ends them (`ap` holds those after `first`). */
static size_t count_args(const char *first, va_list ap) {
    size_t argc = 0;
    if (first != NULL) {
        argc = 1;
        while (va_arg(ap, const char *) != NULL)
            argc++;
    }
    return argc;
}

/* Fills argv[0..=argc] with `first`, the `argc - 1` arguments after it and
 * the NULL, leaving `ap` after the NULL. */
static void fill_args(const char **argv, const char *first, size_t argc, va_list *ap) {
    argv[0] = first;
    for (size_t i = 1; i <= argc; i++)
        argv[i] = va_arg(*ap, const char *);
}

/* Declares `argv`, holding `first` and the arguments after it in `ap`. */
#define GATHER(argv, first, ap)                                              \
    va_start(ap, first);                                                     \
    size_t argc = count_args(first, ap);                                     \
    va_end(ap);                                                              \
    const char *argv[argc + 1];                                              \
    va_start(ap, first);                                                     \
    fill_args(argv, first, argc, &ap)

__attribute__((visibility("hidden"))) int vsocket_execl(const char *path, const char *arg, ...) {
    va_list ap;
    GATHER(argv, arg, ap);
    va_end(ap);
    return execv(path, (char *const *)argv);
}

__attribute__((visibility("hidden"))) int vsocket_execlp(const char *file, const char *arg, ...) {
    va_list ap;
    GATHER(argv, arg, ap);
    va_end(ap);
    return execvp(file, (char *const *)argv);
}

__attribute__((visibility("hidden"))) int vsocket_execle(const char *path, const char *arg, ...) {
    va_list ap;
    GATHER(argv, arg, ap);
    /* The environment follows the NULL that ends the arguments (`arg`
     * itself when there are none). */
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, (char *const *)argv, envp);
}
