/* The basic kernel types BPF programs and bcc's generated tracepoint structs use.
 * Kernel struct layouts are never taken from here: offsets come from BTF. */
#ifndef __FSWA_TYPES_H
#define __FSWA_TYPES_H
typedef signed char s8;
typedef unsigned char u8;
typedef signed short s16;
typedef unsigned short u16;
typedef signed int s32;
typedef unsigned int u32;
typedef signed long long s64;
typedef unsigned long long u64;
typedef s8 __s8;
typedef u8 __u8;
typedef s16 __s16;
typedef u16 __u16;
typedef s32 __s32;
typedef u32 __u32;
typedef s64 __s64;
typedef u64 __u64;
typedef u16 __be16;
typedef u32 __be32;
typedef u64 __be64;
typedef u16 __le16;
typedef u32 __le32;
typedef u64 __le64;
typedef u16 __sum16;
typedef u32 __wsum;
typedef _Bool bool;
#define __aligned_u64 __u64 __attribute__((aligned(8)))
#define __aligned_be64 __be64 __attribute__((aligned(8)))
#define __aligned_le64 __le64 __attribute__((aligned(8)))
typedef u32 __kernel_pid_t;
#define true 1
#define false 0
typedef unsigned long size_t;
typedef long ssize_t;
typedef unsigned long uintptr_t;
typedef int pid_t;
typedef u32 uid_t;
typedef u32 gid_t;
typedef u32 dev_t;
typedef unsigned long ino_t;
typedef s64 time64_t;
typedef long long loff_t;
typedef unsigned short umode_t;
typedef unsigned int gfp_t;
typedef u64 sector_t;
typedef int clockid_t;
#define NULL ((void *)0)
#endif
