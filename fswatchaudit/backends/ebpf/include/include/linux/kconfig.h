/* Minimal stand-in for the kernel's kconfig.h: bcc includes it first. */
#ifndef __FSWA_KCONFIG_H
#define __FSWA_KCONFIG_H
#define CONFIG_BPF_SYSCALL 1
#define CONFIG_BPF_EVENTS 1
#endif
