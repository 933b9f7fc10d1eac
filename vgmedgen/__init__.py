"""vgmedgen: train VG-MedGen on Ray and augment medical datasets with it."""
