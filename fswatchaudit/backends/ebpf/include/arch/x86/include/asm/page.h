#ifndef __FSWA_PAGE_H
#define __FSWA_PAGE_H
#define PAGE_SIZE 4096UL
#endif
