#ifndef __FSWA_VERSION_H
#define __FSWA_VERSION_H
#ifndef LINUX_VERSION_CODE
#define LINUX_VERSION_CODE 0
#endif
#define KERNEL_VERSION(a, b, c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))
#endif
