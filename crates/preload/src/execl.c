/* execl, execlp and execle take the new program's arguments as a variadic
 * list, which stable Rust cannot receive. These gather the list into an
 * array, as glibc's own do, and call execv, execvp and execve: the
 * library's hooks (hooks.rs), so that connections cross these execs too.
 * The exported execl, execlp and execle are jumps to these (hooks.rs). */

#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

/* The number of arguments up to the NULL that ends them. */
#define COUNT_ARGS(first, argc)                                              \
    do {                                                                     \
        va_list count_ap;                                                    \
        argc = 0;                                                            \
        if (first != NULL) {                                                 \
            argc = 1;                                                        \
            va_start(count_ap, first);                                       \
            while (va_arg(count_ap, const char *) != NULL)                   \
                argc++;                                                      \
            va_end(count_ap);                                                \
        }                                                                    \
    } while (0)

__attribute__((visibility("hidden"))) int vsocket_execl(const char *path, const char *arg, ...) {
    size_t argc;
    COUNT_ARGS(arg, argc);
    const char *argv[argc + 1];
    argv[0] = arg;
    va_list ap;
    va_start(ap, arg);
    for (size_t i = 1; i <= argc; i++)
        argv[i] = va_arg(ap, const char *);
    va_end(ap);
    return execv(path, (char *const *)argv);
}

__attribute__((visibility("hidden"))) int vsocket_execlp(const char *file, const char *arg, ...) {
    size_t argc;
    COUNT_ARGS(arg, argc);
    const char *argv[argc + 1];
    argv[0] = arg;
    va_list ap;
    va_start(ap, arg);
    for (size_t i = 1; i <= argc; i++)
        argv[i] = va_arg(ap, const char *);
    va_end(ap);
    return execvp(file, (char *const *)argv);
}

__attribute__((visibility("hidden"))) int vsocket_execle(const char *path, const char *arg, ...) {
    size_t argc;
    COUNT_ARGS(arg, argc);
    const char *argv[argc + 1];
    argv[0] = arg;
    va_list ap;
    va_start(ap, arg);
    for (size_t i = 1; i <= argc; i++)
        argv[i] = va_arg(ap, const char *);
    /* The environment follows the NULL that ends the arguments (`arg`
     * itself when there are none). */
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, (char *const *)argv, envp);
}
