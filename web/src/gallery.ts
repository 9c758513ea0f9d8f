// The images this browser bought, newest first, kept in localStorage so a reload does not lose them
// (the image URLs are permanent).

import type { GeneratedImage } from "./api";

export interface GalleryEntry {
  id: string;
  createdAt: string;
  modelName: string;
  prompt: string;
  // The request body as sent: "use these settings again" restores it.
  request: Record<string, unknown>;
  images: GeneratedImage[];
  priceUsd: string | null;
  transaction: string | null;
  // Link to the transaction on the network's block explorer; null on the dev chain or when free.
  transactionUrl: string | null;
}

const STORAGE_KEY = "imagegate.playground.gallery.v1";
const KEEP = 30;

export function loadGallery(): GalleryEntry[] {
  try {
    const stored = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "[]") as unknown;
    return Array.isArray(stored) ? (stored as GalleryEntry[]) : [];
  } catch {
    return [];
  }
}

export function saveGallery(entries: GalleryEntry[]): void {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(entries.slice(0, KEEP)));
  } catch {
    // Storage full or switched off: the gallery lasts for this visit only.
  }
}

export function explorerLink(explorerUrl: string | null, transaction: string | null): string | null {
  return explorerUrl && transaction ? `${explorerUrl.replace(/\/$/, "")}/tx/${transaction}` : null;
}
